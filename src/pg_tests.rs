//! `#[pg_test]`s: code that needs a backend, run inside PostgreSQL by `cargo pgrx test`.

#[pgrx::pg_schema]
mod tests {
    use crate::errors::VerifyError;
    use crate::keys::{self, Algorithm};
    use crate::verify::{self, Request};
    use pgrx::prelude::*;

    fn create(options: &str) -> (String, pgrx::Uuid) {
        let sql = format!("SELECT key, id FROM keypal_create({options})");
        let (key, id) = Spi::get_two::<String, pgrx::Uuid>(&sql).unwrap();
        (key.unwrap(), id.unwrap())
    }

    #[pg_test]
    fn new_key_ids_are_version_7_and_carry_the_time() {
        let (_, a) = create("owner_id => 'v7'");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let (_, b) = create("owner_id => 'v7'");
        for u in [a, b] {
            assert_eq!(u.as_bytes()[6] >> 4, 7, "version 7");
            assert_eq!(u.as_bytes()[8] >> 6, 0b10, "RFC 9562 variant");
        }
        assert!(b.as_bytes() > a.as_bytes(), "a later key's id sorts after");
        // The id's milliseconds are the clock's when the key was made.
        let ms = |u: pgrx::Uuid| {
            u.as_bytes()[..6]
                .iter()
                .fold(0i64, |n, b| (n << 8) | i64::from(*b))
        };
        let now =
            Spi::get_one::<i64>("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8")
                .unwrap()
                .unwrap();
        assert!((0..60_000).contains(&(now - ms(b))), "{now} vs {}", ms(b));
    }

    #[pg_test]
    fn quota_periods_agree_with_date_trunc() {
        // Timestamps across leap years, month ends, week starts and before 2000.
        let sql = "SELECT array_agg((extract(epoch FROM t - '2000-01-01 UTC') * 1000000)::int8 ORDER BY t),
                          array_agg((extract(epoch FROM date_trunc(p, t, 'UTC') - '2000-01-01 UTC') * 1000000)::int8 ORDER BY t)
                     FROM unnest('{day,week,month,year}'::text[]) p,
                          generate_series('1999-12-20 UTC'::timestamptz, '2029-03-02 UTC', '1 day 7 hours 13 minutes') t
                    WHERE p = $1";
        for period in ["day", "week", "month", "year"] {
            let (ts, starts) =
                Spi::get_two_with_args::<Vec<i64>, Vec<i64>>(sql, &[period.into()]).unwrap();
            let (ts, starts) = (ts.unwrap(), starts.unwrap());
            assert!(ts.len() > 8000);
            for (t, s) in ts.iter().zip(&starts) {
                assert_eq!(
                    crate::limits::quota::period_start_us(period, *t),
                    Some(*s),
                    "{period} of {t}"
                );
            }
        }
    }

    #[pg_test]
    fn settings_cache_keeps_no_load_an_invalidation_overtook() {
        let settings = Spi::get_one::<pg_sys::Oid>("SELECT 'keypal.settings'::regclass::oid")
            .unwrap()
            .unwrap();
        let _ = crate::catalog::get();
        assert!(crate::catalog::is_cached());
        let _ = crate::catalog::load_overtaken_by(settings);
        assert!(
            !crate::catalog::is_cached(),
            "a load an invalidation overtook was kept"
        );
        let _ = crate::catalog::get();
        assert!(crate::catalog::is_cached(), "the next load is kept");
    }

    #[pg_test]
    fn key_state_follows_schedules_and_ancestors() {
        let (_, parent) = create("owner_id => 'st', scopes => '{read}'");
        let (_, child) = create(&format!(
            "owner_id => 'st', scopes => '{{read}}', parent_id => '{parent}'"
        ));
        let state = |id: pgrx::Uuid| {
            Spi::get_one_with_args::<String>("SELECT keypal.key_state($1)", &[id.into()]).unwrap()
        };
        assert_eq!(state(child), None);
        assert_eq!(
            state(pgrx::Uuid::from_bytes([7; 16])).as_deref(),
            Some("INVALID_KEY")
        );
        Spi::run_with_args(
            "UPDATE keypal.keys SET revoke_at = now() - interval '1 s' WHERE id = $1",
            &[parent.into()],
        )
        .unwrap();
        assert_eq!(state(parent).as_deref(), Some("REVOKED"));
        assert_eq!(state(child).as_deref(), Some("REVOKED"));
    }

    #[pg_test]
    fn verify_path_accepts_and_rejects() {
        let (key, _) = create("owner_id => 'u1', scopes => '{read}'");
        let read = Request {
            scope: Some("read"),
            ..Default::default()
        };
        let write = Request {
            scope: Some("write"),
            ..Default::default()
        };
        assert_eq!(verify::verify(Some(&key), &read).1, None);
        assert_eq!(
            verify::verify(Some(&key), &write).1,
            Some(VerifyError::InsufficientScope)
        );
        assert_eq!(verify::verify(None, &read).1, Some(VerifyError::MissingKey));
        let unknown = "A".repeat(32);
        assert_eq!(
            verify::verify(Some(&unknown), &read).1,
            Some(VerifyError::InvalidKey)
        );
    }

    #[pg_test]
    fn sql_hash_matches_rust_hash_with_the_salt() {
        Spi::run("SET keypal.salt = 'pepper'").unwrap();
        let sql = Spi::get_one::<Vec<u8>>("SELECT keypal.hash_key('abc', 'sha512')")
            .unwrap()
            .unwrap();
        let rust = keys::hash_key("abc", &keys::salt_suffix("pepper"), Algorithm::Sha512);
        assert_eq!(sql, rust);
        Spi::run("RESET keypal.salt").unwrap();
    }

    #[pg_test]
    fn short_durations_become_intervals() {
        let v = Spi::get_one::<String>("SELECT keypal.parse_duration('2w', 'x')::text").unwrap();
        assert_eq!(v.as_deref(), Some("14 days"));
        let v = Spi::get_one::<String>("SELECT keypal.parse_duration('90m', 'x')::text").unwrap();
        assert_eq!(v.as_deref(), Some("01:30:00"));
        let v = Spi::get_one::<String>("SELECT keypal.parse_duration('1 mon', 'x')::text").unwrap();
        assert_eq!(v.as_deref(), Some("1 mon"));
    }

    #[pg_test(
        error = "invalid duration for expires_in: 'tomorrow' (use e.g. 30s, 5m, 1h, 7d, 2w, 1y or an interval)"
    )]
    fn bad_duration_names_the_argument() {
        Spi::run("SELECT keypal.parse_duration('tomorrow', 'expires_in')").unwrap();
    }

    #[pg_test(error = "invalid scopes: must be an array of strings")]
    fn options_are_checked_in_sql() {
        Spi::run(r#"SELECT keypal.normalize_options('{"owner_id": "u", "scopes": "read"}')"#)
            .unwrap();
    }

    #[pg_test]
    fn authenticate_sets_the_identity_for_the_transaction() {
        let (key, id) = create("owner_id => 'who', org_id => 'org', scopes => '{read}'");
        assert_eq!(
            Spi::get_one::<String>("SELECT keypal_current_owner()").unwrap(),
            None
        );
        Spi::run(&format!("SELECT keypal_authenticate('{key}')")).unwrap();
        assert_eq!(
            Spi::get_one::<String>("SELECT keypal_current_owner()")
                .unwrap()
                .as_deref(),
            Some("who")
        );
        assert_eq!(
            Spi::get_one::<pgrx::Uuid>("SELECT keypal_current_key_id()").unwrap(),
            Some(id)
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT keypal_current_has_scope('read')").unwrap(),
            Some(true)
        );
    }

    #[pg_test]
    fn generated_keys_follow_the_settings() {
        Spi::run("SELECT keypal_configure(prefix => 'pk_', length => 40, alphabet => '0-9')")
            .unwrap();
        let (key, _) = create("owner_id => 'fmt'");
        assert!(key.starts_with("pk_"));
        assert_eq!(key.len(), 43);
        assert!(key[3..].bytes().all(|b| b.is_ascii_digit()));
    }
}
