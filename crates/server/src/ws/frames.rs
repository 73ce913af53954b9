//! The frames of the protocol: the client's ops parsed, and the replies, events and errors
//! written back.

use super::*;

/// `{"op":"error","id":…,"sub":…,"error":{problem}}`.
pub(super) fn error_frame(id: Option<Value>, sub: Option<&str>, problem: &Problem) -> Value {
    let mut m = Map::new();
    m.insert("op".into(), Value::from("error"));
    if let Some(sub) = sub {
        m.insert("sub".into(), Value::from(sub));
    } else {
        m.insert("id".into(), id.unwrap_or(Value::Null));
    }
    m.insert("error".into(), problem.body());
    Value::Object(m)
}

/// The reply to one command that went through, as the WebSocket (`op: "result"`) and
/// Socket.IO (no `op`) send it: the command result's fields, and `"replayed": true` on a retry.
/// Serialised straight from the result, without an intermediate `Value`.
#[derive(serde::Serialize)]
pub(crate) struct ResultReply<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    op: Option<&'static str>,
    #[serde(flatten)]
    result: &'a sourced_engine::CommandResult,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replayed: bool,
}

impl<'a> ResultReply<'a> {
    pub(crate) fn new(op: Option<&'static str>, outcome: &'a CommandOutcome) -> ResultReply<'a> {
        ResultReply { op, result: &outcome.result, replayed: outcome.replayed }
    }

    /// The command id and the problem, for a reply that could not be serialised.
    pub(crate) fn unserialisable(&self, e: &serde_json::Error) -> (Option<Value>, Problem) {
        (Some(Value::from(self.result.id.to_string())), Problem::internal(e))
    }
}

/// `{"op":"event","sub":…,"event":…}`, built with one allocation.
pub(super) fn event_frame(sub_json: &str, event: &str) -> String {
    const HEAD: &str = r#"{"op":"event","sub":"#;
    const MIDDLE: &str = r#","event":"#;
    let mut frame = String::with_capacity(HEAD.len() + sub_json.len() + MIDDLE.len() + event.len() + 1);
    frame.push_str(HEAD);
    frame.push_str(sub_json);
    frame.push_str(MIDDLE);
    frame.push_str(event);
    frame.push('}');
    frame
}

/// `{"op":"events","sub":…,"events":[…]}`, built with one allocation.
pub(super) fn batch_frame(sub_json: &str, events: &[Arc<str>]) -> String {
    const HEAD: &str = r#"{"op":"events","sub":"#;
    const MIDDLE: &str = r#","events":["#;
    let len: usize = events.iter().map(|e| e.len() + 1).sum();
    let mut frame = String::with_capacity(HEAD.len() + sub_json.len() + MIDDLE.len() + len + 2);
    frame.push_str(HEAD);
    frame.push_str(sub_json);
    frame.push_str(MIDDLE);
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            frame.push(',');
        }
        frame.push_str(event);
    }
    frame.push_str("]}");
    frame
}

/// A parsed client frame.
#[derive(Debug)]
pub(super) enum Frame {
    Command(Value),
    /// `framing` is `Batched` when the frame asked for `"batch": true`.
    Subscribe {
        sub: String,
        tenant: Option<TenantId>,
        filter: SubscriptionFilter,
        start: Start,
        framing: Framing,
    },
    Unsubscribe {
        sub: String,
    },
    Ping,
}

/// A frame that cannot be used: the command id, if one was found, and the problem (boxed:
/// the error path is rare and the problem large).
pub(super) type FrameError = Box<(Option<Value>, Problem)>;

impl Frame {
    pub(super) fn parse(text: &str, depth_max: usize) -> Result<Frame, FrameError> {
        let bad = |detail: String| Box::new((None, Problem::bad_request(detail, vec![])));
        let v: Value = sourced_core::json::parse(text.as_bytes(), depth_max).map_err(|e| {
            let p = match e {
                sourced_core::json::JsonError::Syntax(e) => {
                    Problem::bad_request(format!("the frame is not valid JSON: {e}"), vec![])
                }
                other => Problem::from(other),
            };
            Box::new((None, p))
        })?;
        let Value::Object(mut m) = v else { return Err(bad("a frame must be a JSON object".into())) };
        let op = match m.remove("op") {
            Some(Value::String(op)) => op,
            Some(_) => return Err(bad("'op' must be a string".into())),
            None => return Err(bad("the frame has no 'op'".into())),
        };
        let known: &[&str] = match op.as_str() {
            "command" => &["command"],
            "subscribe" => &["sub", "tenant", "filter", "after", "batch"],
            "unsubscribe" => &["sub"],
            "ping" => &[],
            other => {
                return Err(bad(format!("unknown op '{other}'; expected command, subscribe, unsubscribe or ping")));
            }
        };
        if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
            let id = m.get("command").and_then(|c| c.get("id")).filter(|v| v.is_string()).cloned();
            return Err(Box::new((id, Problem::bad_request(format!("unknown field '{k}' in a '{op}' frame"), vec![]))));
        }
        match op.as_str() {
            "command" => match m.remove("command") {
                Some(c @ Value::Object(_)) => Ok(Frame::Command(c)),
                Some(_) => Err(bad("'command' must be an object (the command envelope)".into())),
                None => Err(bad("a 'command' frame needs the field 'command' (the command envelope)".into())),
            },
            "subscribe" => {
                let sub = sub_name(m.remove("sub")).map_err(bad)?;
                let tenant = match m.remove("tenant") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(t)) => {
                        Some(TenantId::parse(&t).map_err(|e| bad(format!("invalid tenant: {}", e.message)))?)
                    }
                    Some(_) => return Err(bad("'tenant' must be a string".into())),
                };
                let filter = filter(m.remove("filter")).map_err(bad)?;
                let start = match m.remove("after") {
                    None | Some(Value::Null) => Start::Beginning,
                    Some(Value::String(s)) if s == "now" => Start::Now,
                    Some(Value::Number(n)) if n.as_u64().is_some() => Start::After(Position(n.as_u64().unwrap_or(0))),
                    Some(_) => return Err(bad("'after' must be a position (a whole number) or \"now\"".into())),
                };
                let framing = match m.remove("batch") {
                    None | Some(Value::Null | Value::Bool(false)) => Framing::PerEvent,
                    Some(Value::Bool(true)) => Framing::Batched,
                    Some(_) => return Err(bad("'batch' must be true or false".into())),
                };
                Ok(Frame::Subscribe { sub, tenant, filter, start, framing })
            }
            "unsubscribe" => Ok(Frame::Unsubscribe { sub: sub_name(m.remove("sub")).map_err(bad)? }),
            _ => Ok(Frame::Ping),
        }
    }
}

pub(super) fn sub_name(v: Option<Value>) -> Result<String, String> {
    match v {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= SUB_NAME_BYTES_MAX => Ok(s),
        Some(Value::String(_)) => Err(format!("'sub' must be 1 to {SUB_NAME_BYTES_MAX} bytes")),
        Some(_) => Err("'sub' must be a string".into()),
        None => Err("the frame needs 'sub', the subscription's name".into()),
    }
}

/// `{"targetName": …, "targetId": …}`, both optional.
pub(super) fn filter(v: Option<Value>) -> Result<SubscriptionFilter, String> {
    let m = match v {
        None | Some(Value::Null) => return Ok(SubscriptionFilter::default()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("'filter' must be an object".into()),
    };
    let mut f = SubscriptionFilter::default();
    for (k, v) in m {
        let s = v.as_str().ok_or_else(|| format!("filter.{k} must be a string"))?;
        match k.as_str() {
            "targetName" => {
                f.target_name = Some(TypeName::parse(s).map_err(|e| format!("filter.targetName: {}", e.message))?)
            }
            "targetId" => {
                f.target_id = Some(AggregateId::parse(s).map_err(|e| format!("filter.targetId: {}", e.message))?)
            }
            other => return Err(format!("unknown filter field '{other}'; known: targetName, targetId")),
        }
    }
    Ok(f)
}
