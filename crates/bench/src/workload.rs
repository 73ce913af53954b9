//! The benchmark's requests: a ~300-byte JSON document per new aggregate, then a 1–2 op JSON
//! Patch of it. Built with `format!` rather than serde so the load generator stays cheap.

/// The aggregate type every benchmark command targets.
pub(crate) const TYPE_NAME: &str = "bench";

/// The exact size of every created document, in bytes.
pub(crate) const DOCUMENT_BYTES: usize = 300;

/// A unique aggregate id for a client's `seq`-th aggregate.
pub(crate) fn aggregate_id(client: usize, seq: u64) -> String {
    format!("c{client:04}-{seq:010}")
}

/// The document that creates aggregate `id`: [`DOCUMENT_BYTES`] long, padded by its `note`.
pub(crate) fn document(id: &str, seq: u64) -> Vec<u8> {
    let head = format!(
        concat!(
            r#"{{"id":"{id}","customer":{{"name":"Customer {seq}","email":"customer{seq}@example.com","tier":"gold"}},"#,
            r#""status":"open","currency":"EUR","total":123.45,"#,
            r#""lines":[{{"sku":"SKU-{sku:04}","qty":2,"price":19.99}},{{"sku":"SKU-{sku2:04}","qty":1,"price":83.47}}],"#,
            r#""note":""#
        ),
        id = id,
        seq = seq,
        sku = seq % 10_000,
        sku2 = (seq + 1) % 10_000,
    );
    let tail = "\"}";
    let padding = DOCUMENT_BYTES.saturating_sub(head.len() + tail.len());
    let mut body = Vec::with_capacity(DOCUMENT_BYTES);
    body.extend_from_slice(head.as_bytes());
    body.resize(head.len() + padding, b'x');
    body.extend_from_slice(tail.as_bytes());
    body
}

/// The patch applied to the `seq`-th aggregate: one op on even `seq`, two on odd. Each
/// changes the document (never a no-op) and leaves server-owned fields alone.
pub(crate) fn patch(seq: u64) -> Vec<u8> {
    if seq.is_multiple_of(2) {
        br#"[{"op":"replace","path":"/status","value":"paid"}]"#.to_vec()
    } else {
        format!(
            r#"[{{"op":"replace","path":"/status","value":"shipped"}},{{"op":"add","path":"/tracking","value":"TRK-{seq:010}"}}]"#
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_json_of_the_promised_size() {
        for (client, seq) in [(0, 0), (63, 1), (1023, 9_999_999_999)] {
            let id = aggregate_id(client, seq);
            let body = document(&id, seq);
            assert_eq!(body.len(), DOCUMENT_BYTES);
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(value["id"], serde_json::Value::from(id));
            assert_eq!(value["status"], "open");
        }
    }

    #[test]
    fn patches_are_one_or_two_ops_that_change_the_status() {
        for seq in [0, 1] {
            let ops: Vec<serde_json::Value> = serde_json::from_slice(&patch(seq)).unwrap();
            assert_eq!(ops.len(), seq as usize + 1);
            assert_eq!(ops[0]["path"], "/status");
            assert_ne!(ops[0]["value"], "open");
        }
    }
}
