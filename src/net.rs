//! IP and region rules, pure Rust. Lists hold addresses or CIDR blocks, IPv4 and IPv6.

use ipnet::IpNet;
use std::net::IpAddr;

/// Parses one list entry: a CIDR block, or a bare address (a /32 or /128).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))
}

/// Whether `ip` falls inside any entry. Entries that do not parse never match (they are
/// refused when a key is created, so none should be stored).
pub fn in_any<S: AsRef<str>>(ip: IpAddr, list: &[S]) -> bool {
    let ip = canonical(ip);
    list.iter()
        .filter_map(|s| parse_net(s.as_ref()).ok())
        .any(|n| n.contains(&ip))
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are treated as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The allow/block decision shared by IPs and regions: blocked wins; with an allow list,
/// the value must be given and on it.
pub fn allowed<T>(
    value: Option<T>,
    allow: &[impl Sized],
    blocked_hit: impl Fn(&T) -> bool,
    allowed_hit: impl Fn(&T) -> bool,
) -> bool {
    match value {
        Some(v) => !blocked_hit(&v) && (allow.is_empty() || allowed_hit(&v)),
        None => allow.is_empty(),
    }
}

/// A region is an ISO 3166-1 alpha-2 code; compared case-insensitively.
pub fn valid_region(s: &str) -> bool {
    s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic())
}

pub fn region_in<S: AsRef<str>>(country: &str, list: &[S]) -> bool {
    list.iter()
        .any(|r| r.as_ref().eq_ignore_ascii_case(country.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_and_bare_addresses() {
        let list = ["192.168.1.0/24", "10.0.0.1", "2001:db8::/32"];
        assert!(in_any(ip("192.168.1.77"), &list));
        assert!(in_any(ip("10.0.0.1"), &list));
        assert!(!in_any(ip("10.0.0.2"), &list));
        assert!(in_any(ip("2001:db8::5"), &list));
        assert!(!in_any(ip("2001:db9::5"), &list));
        assert!(in_any(ip("::ffff:192.168.1.3"), &list));
    }

    #[test]
    fn bad_entries() {
        assert!(parse_net("300.1.1.1").is_err());
        assert!(parse_net("1.2.3.4/33").is_err());
        assert!(parse_net("").is_err());
        assert!(parse_net("::1").is_ok());
    }

    #[test]
    fn allow_and_block() {
        let allow = ["10.0.0.0/8"];
        let check = |v: Option<IpAddr>, allow: &[&str], block: &[&str]| {
            allowed(v, allow, |i| in_any(*i, block), |i| in_any(*i, allow))
        };
        assert!(check(Some(ip("10.1.1.1")), &allow, &[]));
        assert!(!check(Some(ip("11.1.1.1")), &allow, &[]));
        assert!(!check(None, &allow, &[]));
        assert!(check(None, &[], &[]));
        assert!(!check(Some(ip("10.1.1.1")), &allow, &["10.1.0.0/16"]));
        assert!(check(Some(ip("1.1.1.1")), &[], &["10.1.0.0/16"]));
    }

    #[test]
    fn regions() {
        assert!(valid_region("DE"));
        assert!(!valid_region("DEU"));
        assert!(region_in("de", &["DE", "FR"]));
        assert!(!region_in("US", &["DE"]));
    }
}
