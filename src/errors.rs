//! Every error keypal reports, with its SQLSTATE, in one place.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Why a verify failed, in the order verify checks (SPEC §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyError {
    MissingKey,
    InvalidFormat,
    InvalidKey,
    Revoked,
    Disabled,
    Expired,
    EnvMismatch,
    IpNotAllowed,
    RegionNotAllowed,
    InsufficientScope,
    RateLimited,
    QuotaExceeded,
}

impl VerifyError {
    /// Every error, in SPEC §4 order (keypal_stats() counts each).
    pub const ALL: [VerifyError; 12] = [
        VerifyError::MissingKey,
        VerifyError::InvalidFormat,
        VerifyError::InvalidKey,
        VerifyError::Revoked,
        VerifyError::Disabled,
        VerifyError::Expired,
        VerifyError::EnvMismatch,
        VerifyError::IpNotAllowed,
        VerifyError::RegionNotAllowed,
        VerifyError::InsufficientScope,
        VerifyError::RateLimited,
        VerifyError::QuotaExceeded,
    ];

    pub fn code(self) -> &'static str {
        match self {
            VerifyError::MissingKey => "MISSING_KEY",
            VerifyError::InvalidFormat => "INVALID_FORMAT",
            VerifyError::InvalidKey => "INVALID_KEY",
            VerifyError::Revoked => "REVOKED",
            VerifyError::Disabled => "DISABLED",
            VerifyError::Expired => "EXPIRED",
            VerifyError::EnvMismatch => "ENV_MISMATCH",
            VerifyError::IpNotAllowed => "IP_NOT_ALLOWED",
            VerifyError::RegionNotAllowed => "REGION_NOT_ALLOWED",
            VerifyError::InsufficientScope => "INSUFFICIENT_SCOPE",
            VerifyError::RateLimited => "RATE_LIMITED",
            VerifyError::QuotaExceeded => "QUOTA_EXCEEDED",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            VerifyError::MissingKey => "API key is missing",
            VerifyError::InvalidFormat => "Invalid API key format",
            VerifyError::InvalidKey => "Invalid API key",
            VerifyError::Revoked => "API key has been revoked",
            VerifyError::Disabled => "API key is disabled",
            VerifyError::Expired => "API key has expired",
            VerifyError::EnvMismatch => "API key belongs to another environment",
            VerifyError::IpNotAllowed => "IP address not allowed",
            VerifyError::RegionNotAllowed => "Region not allowed",
            VerifyError::InsufficientScope => "Insufficient scope",
            VerifyError::RateLimited => "Rate limit exceeded",
            VerifyError::QuotaExceeded => "Quota exceeded",
        }
    }

    /// The SQLSTATE `keypal_require` raises (SPEC §5): the key itself is bad → 28000;
    /// the key is fine but not for this request → 42501; a limit → 53400.
    pub fn sqlstate(self) -> PgSqlErrorCode {
        use VerifyError::*;
        match self {
            MissingKey | InvalidFormat | InvalidKey | Revoked | Disabled | Expired => {
                PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION
            }
            EnvMismatch | IpNotAllowed | RegionNotAllowed | InsufficientScope => {
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE
            }
            RateLimited | QuotaExceeded => PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
        }
    }

    /// Raises this failure as an ERROR: message, DETAIL = the code (SPEC §5), HINT = the
    /// retry delay, or for INSUFFICIENT_SCOPE the scope missing.
    pub fn raise(self, retry_after_ms: Option<i64>, missing_scope: Option<String>) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.message(), "keypal_require")
            .set_detail(self.code());
        if let Some(ms) = retry_after_ms {
            report = report.set_hint(format!("retry after {ms} ms"));
        } else if let Some(scope) = missing_scope.filter(|_| self == VerifyError::InsufficientScope)
        {
            report = report.set_hint(format!("the key does not hold scope {scope}"));
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Raises a bad-argument error (22023) naming the argument.
pub fn bad_argument(arg: &str, why: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("invalid {arg}: {why}"),
    )
}

/// Raises a bad-duration error (22007) naming the argument.
pub fn bad_duration(arg: &str, why: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_DATETIME_FORMAT,
        format!("invalid duration for {arg}: {why}"),
    )
}

/// Raises an option options.rs refused: 22007 for a duration, else 22023, naming it.
pub fn refuse_option(e: crate::options::OptionError) -> ! {
    if e.is_duration {
        bad_duration(&e.arg, &e.why)
    } else {
        bad_argument(&e.arg, &e.why)
    }
}

pub fn raise(code: PgSqlErrorCode, message: String) -> ! {
    ErrorReport::new(code, message, "keypal").report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_upper_snake() {
        use VerifyError::*;
        let all = [
            MissingKey,
            InvalidFormat,
            InvalidKey,
            Revoked,
            Disabled,
            Expired,
            EnvMismatch,
            IpNotAllowed,
            RegionNotAllowed,
            InsufficientScope,
            RateLimited,
            QuotaExceeded,
        ];
        let mut codes: Vec<_> = all.iter().map(|e| e.code()).collect();
        codes.dedup();
        assert_eq!(codes.len(), 12);
        assert!(codes
            .iter()
            .all(|c| c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')));
        assert_eq!(Revoked.message(), "API key has been revoked");
    }
}
