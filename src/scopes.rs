//! Scope matching, pure Rust.
//!
//! A key holds global scopes (`{read,write}`) and per-resource scopes
//! (`{"project:123": ["read"]}`). A global scope satisfies every resource; a resource's
//! scopes count only when that resource is asked about; `*` (globally, or in a resource's
//! list) grants everything it covers. A resource entry `type:*` covers every id of that type.

use serde_json::Value;

pub const WILDCARD: &str = "*";

/// Whether the key holds `scope`, globally or (when `resource` is given) on that resource.
pub fn holds<S: AsRef<str>>(
    global: &[S],
    resources: Option<&Value>,
    scope: &str,
    resource: Option<&str>,
) -> bool {
    if global
        .iter()
        .any(|g| g.as_ref() == scope || g.as_ref() == WILDCARD)
    {
        return true;
    }
    match (resource, resources) {
        (Some(r), Some(map)) => resource_entries(map, r).any(|list| list_grants(list, scope)),
        _ => false,
    }
}

fn list_grants(list: &Value, scope: &str) -> bool {
    list.as_array().is_some_and(|a| {
        a.iter()
            .any(|s| s.as_str().is_some_and(|s| s == scope || s == WILDCARD))
    })
}

/// The scope lists that apply to `resource`: its own entry and its type's `type:*` entry.
fn resource_entries<'a>(map: &'a Value, resource: &str) -> impl Iterator<Item = &'a Value> {
    let type_wildcard = resource.split_once(':').map(|(t, _)| format!("{t}:*"));
    let own = map.get(resource);
    let by_type = type_wildcard.and_then(|k| map.get(&k));
    own.into_iter().chain(by_type)
}

/// Whether every scope in `child` is held by a parent with `parent` global scopes.
pub fn is_subset<S: AsRef<str>, T: AsRef<str>>(child: &[S], parent: &[T]) -> bool {
    child.iter().all(|c| {
        parent
            .iter()
            .any(|p| p.as_ref() == WILDCARD || p.as_ref() == c.as_ref())
    })
}

/// Checks a `resources` value: an object mapping `type:id` to an array of scope strings.
pub fn check_resources(v: &Value) -> Result<(), String> {
    let map = v
        .as_object()
        .ok_or("resources must be a JSON object mapping \"type:id\" to an array of scopes")?;
    for (k, list) in map {
        if !k.contains(':') || k.starts_with(':') {
            return Err(format!("resources key {k:?} must look like \"type:id\""));
        }
        let arr = list
            .as_array()
            .ok_or_else(|| format!("resources[{k:?}] must be an array of scope strings"))?;
        if let Some(bad) = arr.iter().find(|s| !s.as_str().is_some_and(valid_scope)) {
            return Err(format!("resources[{k:?}] holds an invalid scope: {bad}"));
        }
    }
    Ok(())
}

/// A scope is 1–128 printable ASCII characters, no whitespace.
pub fn valid_scope(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn global_scopes() {
        assert!(holds(&["read"], None, "read", None));
        assert!(!holds(&["read"], None, "write", None));
        assert!(holds(&["read"], None, "read", Some("project:1")));
        assert!(holds(&["*"], None, "anything", Some("x:1")));
        assert!(!holds::<&str>(&[], None, "read", None));
    }

    #[test]
    fn resource_scopes_count_only_for_their_resource() {
        let r = json!({"project:123": ["read", "write"], "team:*": ["admin"], "doc:9": ["*"]});
        assert!(holds::<&str>(&[], Some(&r), "write", Some("project:123")));
        assert!(!holds::<&str>(&[], Some(&r), "write", Some("project:124")));
        assert!(!holds::<&str>(&[], Some(&r), "write", None));
        assert!(holds::<&str>(&[], Some(&r), "admin", Some("team:7")));
        assert!(!holds::<&str>(&[], Some(&r), "read", Some("team:7")));
        assert!(holds::<&str>(&[], Some(&r), "delete", Some("doc:9")));
    }

    #[test]
    fn subsets() {
        assert!(is_subset(&["read"], &["read", "write"]));
        assert!(!is_subset(&["admin"], &["read", "write"]));
        assert!(is_subset(&["admin"], &["*"]));
        assert!(is_subset::<&str, &str>(&[], &[]));
        assert!(!is_subset(&["*"], &["read"]));
    }

    #[test]
    fn resources_are_checked() {
        assert!(check_resources(&json!({"project:1": ["read"]})).is_ok());
        assert!(check_resources(&json!({})).is_ok());
        assert!(check_resources(&json!([])).is_err());
        assert!(check_resources(&json!({"project": ["read"]})).is_err());
        assert!(check_resources(&json!({"project:1": "read"})).is_err());
        assert!(check_resources(&json!({"project:1": [1]})).is_err());
        assert!(check_resources(&json!({"project:1": [""]})).is_err());
    }
}
