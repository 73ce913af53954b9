//! The HTTP API's routes: which handler serves which method and path (SPEC §3.1). Built from
//! an [`AppState`], so tests drive it with `oneshot` and no socket.

use axum::Router;
use axum::http::Method;
use axum::routing::{any, get, post};

use crate::http::{
    admin_reload, create, custom_command, delete, diff, feed, get_document, healthz, history, list, patch,
    post_command, readyz, replace, schema_file,
};
use crate::problem::Problem;
use crate::state::AppState;

/// The HTTP API.
pub fn router(state: AppState) -> Router {
    let admin = state.reloader.is_some();
    let r = Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(crate::openapi::serve))
        .route("/schemas/{file}", get(schema_file))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::serve))
        .route("/commands", post(post_command))
        .route("/events", get(feed))
        .route("/ws", get(crate::ws::upgrade))
        .route("/processes", get(crate::processes::list))
        .route("/processes/{name}", get(crate::processes::instances))
        .route("/processes/{name}/{key}", get(crate::processes::instance))
        .route("/processes/{name}/{key}/retry", post(crate::processes::retry))
        .route("/processes/{name}/{key}/skip", post(crate::processes::skip))
        .route("/processes/{name}/{key}/cancel", post(crate::processes::cancel))
        .route("/{type}", post(create).get(list))
        .route("/{type}/{id}", get(get_document).put(replace).patch(patch).delete(delete))
        .route("/{type}/{id}/events", get(history))
        .route("/{type}/{id}/diff", get(diff))
        .route("/{type}/{id}/{command}", post(custom_command));
    // Not served unless ADMIN_API=true: there is no authentication yet to protect it. When off,
    // the path says so (without this it would fall to `/{type}/{id}` and answer 405).
    let r = if admin {
        r.route("/admin/reload", post(admin_reload))
    } else {
        r.route(
            "/admin/reload",
            any(|| async { Problem::not_found("the admin API is off; ADMIN_API=true serves POST /admin/reload") }),
        )
    };
    r.fallback(|| async { Problem::not_found("no route matches this path") })
        .method_not_allowed_fallback(|method: Method| async move { Problem::method_not_allowed(method.as_str()) })
        .layer(axum::middleware::from_fn(crate::metrics::track_http))
        .with_state(state)
}
