//! The read side as the server sees it (SPEC §5): documents, histories, lists and the feed,
//! through the engine, so the server talks to the engine only. Reads need no domain rule; they
//! pass to the store, bounded as the store bounds them.

use sourced_core::query::FieldPath;
use sourced_core::{Position, RecordedEvent, StreamKey, TenantId, Version};
use sourced_store::{DocumentRow, DocumentText, ListQuery, StoreError};

use crate::Engine;

impl Engine {
    /// Whether the store answers (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    /// The store's last global position (metrics).
    pub async fn head(&self) -> Result<Position, StoreError> {
        self.store.head().await
    }

    /// One aggregate's read-model row, its document as stored text.
    pub async fn document_text(&self, key: &StreamKey) -> Result<Option<DocumentText>, StoreError> {
        self.store.get_document_text(key).await
    }

    /// Events of one stream with `after < version <= to`, ascending, at most `limit`.
    pub async fn stream_events(
        &self,
        key: &StreamKey,
        after: Version,
        to: Option<Version>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.store.read_stream(key, after, to, limit).await
    }

    /// Whether the stream has any event (a deleted aggregate's stream still has).
    pub async fn stream_exists(&self, key: &StreamKey) -> Result<bool, StoreError> {
        Ok(!self.store.read_stream(key, Version::ZERO, None, 1).await?.is_empty())
    }

    /// A page of one type's read model.
    pub async fn list_documents(&self, query: &ListQuery) -> Result<Vec<DocumentRow>, StoreError> {
        self.store.list_documents(query).await
    }

    /// How many rows match a list query's filters.
    pub async fn count_documents(&self, query: &ListQuery) -> Result<u64, StoreError> {
        self.store.count_documents(query).await
    }

    /// The tenant's events after `after`, ascending, at most `limit` (the global feed).
    pub async fn feed(
        &self,
        tenant: &TenantId,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.store.read_all(tenant, after, limit).await
    }

    /// Creates, where missing, indexes serving filters on these fields; their names.
    pub async fn ensure_indexes(&self, fields: &[FieldPath]) -> Result<Vec<String>, StoreError> {
        self.store.ensure_indexes(fields).await
    }
}
