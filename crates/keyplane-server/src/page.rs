//! Page tokens and page sizes of List calls (AIP-158), server-side only: a token is
//! opaque to clients and accepted only by the call (method and parent) that issued it.

use crate::error::store_status;
use keyplane_store as store;
use tonic::Status;
use uuid::Uuid;

/// Default and maximum page sizes of List calls.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// Largest page a List call returns.
pub const MAX_PAGE_SIZE: i64 = 500;

/// Page token encoding: opaque to clients, hex of `p2`, the list call it was issued
/// by (method and parent, e.g. `ListUsers sites/…`) and the last key returned, so a
/// token is only ever accepted by the call that issued it.
pub fn page_token_encode(list: &str, last_key: &str) -> String {
    hex::encode(format!("p2\n{list}\n{last_key}"))
}

/// The error for a page token that is not one this server issued.
pub fn malformed() -> Status {
    Status::invalid_argument("page_token is malformed: pass back next_page_token unchanged")
}

fn page_token_decode(list: &str, token: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = hex::decode(token).map_err(|_| malformed())?;
    let text = String::from_utf8(bytes).map_err(|_| malformed())?;
    let mut parts = text.splitn(3, '\n');
    let (Some("p2"), Some(issuer), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(malformed());
    };
    if issuer != list {
        return Err(Status::invalid_argument(
            "page_token belongs to another list call (another collection or parent): pass back \
             the next_page_token of this same call, with the same parent, unchanged",
        ));
    }
    Ok(Some(key.to_owned()))
}

/// Checks page size and decodes a page token issued by `list` to the key it holds
/// (None: the first page), for the caller to parse.
pub fn page_key(
    list: &str,
    page_size: i32,
    page_token: &str,
) -> Result<(Option<String>, i64), Status> {
    Ok((page_token_decode(list, page_token)?, page_limit(page_size)?))
}

/// Checks page size and decodes a page token keyed by id, issued by `list`.
pub fn page(list: &str, page_size: i32, page_token: &str) -> Result<store::PageRequest, Status> {
    let limit = page_limit(page_size)?;
    let after = match page_token_decode(list, page_token)? {
        None => None,
        Some(k) => Some(Uuid::try_parse(&k).map_err(|_| malformed())?),
    };
    Ok(store::PageRequest { after, limit })
}

/// Checks page size and decodes a page token keyed by partition number.
pub fn page_partitions(list: &str, page_size: i32, page_token: &str) -> Result<(u8, i64), Status> {
    let limit = page_limit(page_size)?;
    let after = match page_token_decode(list, page_token)? {
        None => 0,
        Some(k) => k.parse().map_err(|_| malformed())?,
    };
    Ok((after, limit))
}

/// Checks page size and decodes a page token keyed by a numeric cursor.
pub fn page_cursor(list: &str, page_size: i32, page_token: &str) -> Result<(i64, i64), Status> {
    let limit = page_limit(page_size)?;
    let after = match page_token_decode(list, page_token)? {
        None => 0,
        Some(k) => k.parse().map_err(|_| malformed())?,
    };
    Ok((after, limit))
}

fn page_limit(page_size: i32) -> Result<i64, Status> {
    page_limit_within(page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
}

fn page_limit_within(page_size: i32, default: i64, max: i64) -> Result<i64, Status> {
    match i64::from(page_size) {
        0 => Ok(default),
        n if n < 0 => Err(Status::invalid_argument("page_size must not be negative")),
        n => Ok(n.min(max)),
    }
}

/// Checks page size against `default` and `max` and decodes a page token keyed by
/// any text (the caller parses it; a token that does not parse is malformed).
pub fn page_keyed(
    list: &str,
    page_size: i32,
    page_token: &str,
    default: i64,
    max: i64,
) -> Result<(Option<String>, i64), Status> {
    let limit = page_limit_within(page_size, default, max)?;
    Ok((page_token_decode(list, page_token)?, limit))
}

/// The error of a page token that decodes but does not parse.
pub fn malformed_token() -> Status {
    malformed()
}

/// Splits a fetched page (fetched with limit + 1) into items and the next token,
/// issued for `list`.
pub fn page_split<T>(
    list: &str,
    mut items: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, String) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if items.len() > limit {
        items.truncate(limit);
        let next = items
            .last()
            .map(|i| page_token_encode(list, &key(i)))
            .unwrap_or_default();
        (items, next)
    } else {
        (items, String::new())
    }
}

/// Fetches one page keyed by id: asks the store for one row more than the page
/// size, so the next page token is only given when there is a next page. `list`
/// names the call and its parent: its tokens are refused by any other.
pub async fn list_page<T, F, Fut>(
    list: &str,
    page_size: i32,
    page_token: &str,
    key: impl Fn(&T) -> String,
    fetch: F,
) -> Result<(Vec<T>, String), Status>
where
    F: FnOnce(store::PageRequest) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, store::StoreError>>,
{
    let mut p = page(list, page_size, page_token)?;
    let limit = p.limit;
    p.limit += 1;
    let items = fetch(p).await.map_err(store_status)?;
    Ok(page_split(list, items, limit, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let list = "ListUsers sites/a";
        let id = Uuid::new_v4();
        let token = page_token_encode(list, &id.to_string());
        assert_eq!(page(list, 10, &token).expect("valid").after, Some(id));
        for bad in [
            "zz",
            "00",
            &hex::encode("p1:x"),
            &hex::encode("p2\nListUsers sites/a"),
            &hex::encode("p2\nListUsers sites/a\nnot-a-uuid"),
        ] {
            let err = page(list, 10, bad).expect_err(bad);
            assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
            assert!(
                err.message().contains("malformed"),
                "{bad}: {}",
                err.message()
            );
        }
        assert_eq!(
            page(list, -1, "").expect_err("negative").code(),
            Code::InvalidArgument
        );
        assert_eq!(page(list, 0, "").expect("default").limit, DEFAULT_PAGE_SIZE);
        assert_eq!(
            page(list, 100_000, "").expect("capped").limit,
            MAX_PAGE_SIZE
        );
    }

    #[test]
    fn page_tokens_are_accepted_only_by_the_call_that_issued_them() {
        let issuer = "ListUsers sites/a";
        let token = page_token_encode(issuer, &Uuid::new_v4().to_string());
        let cursor = page_token_encode(issuer, "7");
        for other in [
            "ListSites",
            "ListUsers sites/b",
            "ListDevices sites/a",
            "ListUsers",
        ] {
            for err in [
                page(other, 10, &token).expect_err(other),
                page_partitions(other, 10, &cursor).expect_err(other),
                page_cursor(other, 10, &cursor).expect_err(other),
            ] {
                assert_eq!(err.code(), Code::InvalidArgument, "{other}");
                assert!(
                    err.message().contains("another list call"),
                    "{other}: {}",
                    err.message()
                );
            }
        }
        assert_eq!(page_cursor(issuer, 10, &cursor).expect("same call").0, 7);
        let (items, next) = page_split(issuer, vec![1, 2, 3], 2, |i| i.to_string());
        assert_eq!(items, vec![1, 2]);
        assert_eq!(page_cursor(issuer, 10, &next).expect("own token").0, 2);
        assert!(page_cursor("ListEvents sites/a", 10, &next).is_err());
    }
}
