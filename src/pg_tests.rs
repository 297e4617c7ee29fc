//! `#[pg_test]`s: code that needs a backend, run inside PostgreSQL by `cargo pgrx test`.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn create_then_verify() {
        let key = Spi::get_one::<String>(
            "SELECT key FROM keypal_create(owner_id => 'u1', scopes => '{read}')",
        )
        .unwrap()
        .unwrap();
        let ok = Spi::get_one_with_args::<bool>(
            "SELECT keypal_check($1, 'read')",
            &[key.as_str().into()],
        )
        .unwrap();
        assert_eq!(ok, Some(true));
        let code = Spi::get_one_with_args::<String>(
            "SELECT (keypal_verify($1, 'write')).error_code",
            &[key.as_str().into()],
        )
        .unwrap();
        assert_eq!(code.as_deref(), Some("INSUFFICIENT_SCOPE"));
    }
}
