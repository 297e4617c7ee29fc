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

/// Whether a webhook may reach `ip` when private targets are refused: not loopback,
/// unspecified, private (RFC 1918, unique-local), shared (CGNAT), link-local, multicast,
/// broadcast, documentation, benchmarking or reserved; IPv4 inside IPv6 (mapped, NAT64,
/// 6to4) is judged as the IPv4 address it carries.
pub fn is_public(ip: IpAddr) -> bool {
    use std::net::{Ipv4Addr, Ipv6Addr};
    fn v4(a: Ipv4Addr) -> bool {
        let o = a.octets();
        !(a.is_unspecified()
            || a.is_loopback()
            || a.is_private()
            || a.is_link_local()
            || a.is_multicast()
            || a.is_broadcast()
            || a.is_documentation()
            || o[0] == 0                                  // "this network"
            || (o[0] == 100 && (64..128).contains(&o[1])) // shared address space (CGNAT)
            || (o[0] == 192 && o[1] == 0 && o[2] == 0)    // IETF protocol assignments
            || (o[0] == 198 && (18..20).contains(&o[1]))  // benchmarking
            || (o[0] == 192 && o[1] == 88 && o[2] == 99)  // 6to4 relay anycast
            || o[0] >= 240) // reserved
    }
    fn v6(a: Ipv6Addr) -> bool {
        let s = a.segments();
        if let Some(m) = a.to_ipv4_mapped() {
            return v4(m);
        }
        let embedded =
            |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
        if s[0] == 0x64 && s[1] == 0xff9b {
            return v4(embedded(s[6], s[7])); // NAT64
        }
        if s[0] == 0x2002 {
            return v4(embedded(s[1], s[2])); // 6to4
        }
        if (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64
            || (s[0] == 0x2001 && s[1] == 0) // Teredo
            || (s[0..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0)
        // IPv4-translated (SIIT)
        {
            return false;
        }
        !(a.is_unspecified()
            || a.is_loopback()
            || a.is_multicast()
            || (s[0] & 0xfe00) == 0xfc00     // unique local
            || (s[0] & 0xffc0) == 0xfe80     // link-local
            || (s[0] & 0xffc0) == 0xfec0     // site-local (deprecated)
            || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
            || (s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0))
        // IPv4-compatible
    }
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => v6(a),
    }
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
    fn private_targets_are_not_public() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2001:db8::1",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip(s)), "{s} counted as public");
        }
        for s in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip(s)), "{s} counted as private");
        }
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
