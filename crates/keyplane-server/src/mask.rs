//! Update masks (AIP-134): which fields an Update call changes.

use tonic::Status;

/// The fields an Update call changes (AIP-134): those named in `update_mask`, or, with
/// no mask or an empty one, those the client set to a non-default value. `fields` lists
/// every updatable field with whether the request sets it.
pub fn mask_paths(
    mask: Option<&prost_types::FieldMask>,
    fields: &[(&str, bool)],
) -> Result<Vec<String>, Status> {
    let allowed = || {
        fields
            .iter()
            .map(|(p, _)| *p)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut paths: Vec<String> = Vec::new();
    // A comma-joined path is the JSON string form of a mask sent through a client that
    // did not split it; field names hold no commas, so splitting is unambiguous.
    let named = mask
        .iter()
        .flat_map(|m| m.paths.iter())
        .flat_map(|p| p.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty());
    for p in named {
        if !fields.iter().any(|(f, _)| *f == p) {
            return Err(Status::invalid_argument(format!(
                "update_mask path {p:?} cannot be updated; allowed: {}",
                allowed()
            )));
        }
        if !paths.iter().any(|q| q == p) {
            paths.push(p.to_owned());
        }
    }
    if paths.is_empty() {
        paths = fields
            .iter()
            .filter(|(_, set)| *set)
            .map(|(p, _)| (*p).to_owned())
            .collect();
    }
    if paths.is_empty() {
        return Err(Status::invalid_argument(format!(
            "nothing to update: set some of {} (to clear a field, name it in update_mask)",
            allowed()
        )));
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_paths_table() {
        let fields = [("display_name", true), ("pin", false), ("scope", true)];
        let mask = |p: &[&str]| prost_types::FieldMask {
            paths: p.iter().map(|s| (*s).to_owned()).collect(),
        };
        type Want<'a> = Result<&'a [&'a str], &'a str>;
        let cases: &[(Option<prost_types::FieldMask>, Want)] = &[
            // No mask, or an empty one: the fields set.
            (None, Ok(&["display_name", "scope"])),
            (Some(mask(&[])), Ok(&["display_name", "scope"])),
            // A mask: exactly its paths, set or not (naming an unset field clears it).
            (Some(mask(&["pin"])), Ok(&["pin"])),
            (Some(mask(&["pin", "scope", "pin"])), Ok(&["pin", "scope"])),
            (Some(mask(&["pin,scope"])), Ok(&["pin", "scope"])),
            (Some(mask(&["valid"])), Err("\"valid\" cannot be updated")),
        ];
        for (m, want) in cases {
            let got = mask_paths(m.as_ref(), &fields).map_err(|s| s.message().to_owned());
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(g, *w, "{m:?}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{m:?}: {g}"),
                (w, g) => panic!("{m:?}: want {w:?}, got {g:?}"),
            }
        }
        let none = mask_paths(None, &[("display_name", false)]).expect_err("nothing set");
        assert!(none.message().contains("nothing to update"));
    }
}
