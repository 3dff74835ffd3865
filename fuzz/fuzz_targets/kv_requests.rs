//! Arbitrary bytes as client requests: protobuf `PutRequest`/`GetRequest`/`DeleteRequest`
//! through the server's validation, and as a `grpc-timeout` header value. Never a panic; a put
//! that passes validation respects the documented limits.
#![no_main]

use kvstore::pb::{DeleteRequest, GetRequest, PutRequest};
use kvstore::server::{check_key, check_put, parse_grpc_timeout, MAX_KEY, MAX_VALUE};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(r) = PutRequest::decode(body) {
                if check_put(&r.key, &r.value).is_ok() {
                    assert!(!r.key.is_empty() && r.key.len() <= MAX_KEY);
                    assert!(r.value.len() <= MAX_VALUE);
                }
            }
        }
        1 => {
            if let Ok(r) = GetRequest::decode(body) {
                if check_key(&r.key).is_ok() {
                    assert!(!r.key.is_empty() && r.key.len() <= MAX_KEY);
                }
            }
        }
        2 => {
            if let Ok(r) = DeleteRequest::decode(body) {
                let _ = check_key(&r.key);
            }
        }
        _ => {
            if let Ok(s) = std::str::from_utf8(body) {
                let _ = parse_grpc_timeout(s);
            }
        }
    }
});
