//! Which IP addresses a user-given URL may reach.
//!
//! Dataset and webhook URLs come from tenants, and the services that fetch
//! or post to them run inside our network: without this check a URL could
//! reach cloud metadata
//! (`169.254.169.254`), an internal service on `10.x`, or the node itself.
//! The check runs on the *resolved* addresses (see `guard.rs`) so a
//! public name pointing at a private address is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// True when `ip` is not a public unicast address: private, loopback,
/// link-local, unspecified, multicast, broadcast, CGNAT, documentation,
/// benchmarking, reserved, or an IPv6 unique-local / link-local / site-local
/// address. IPv6 forms that embed an IPv4 address (mapped, compatible,
/// NAT64, 6to4) are judged by the embedded address; Teredo is refused
/// outright because it can tunnel to anything.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_private()                              // 10/8, 172.16/12, 192.168/16
        || ip.is_loopback()                      // 127/8
        || ip.is_link_local()                    // 169.254/16, cloud metadata
        || ip.is_unspecified()                   // 0.0.0.0
        || ip.is_broadcast()                     // 255.255.255.255
        || ip.is_multicast()                     // 224/4
        || ip.is_documentation()                 // 192.0.2/24, 198.51.100/24, 203.0.113/24
        || a == 0                                // 0/8 "this network"
        || (a == 100 && (b & 0xc0) == 64)        // 100.64/10 CGNAT
        || (a == 192 && b == 0 && c == 0)        // 192.0.0/24 IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18)        // 198.18/15 benchmarking
        || a >= 240 // 240/4 reserved
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_forbidden_v4(v4);
    }
    let seg = ip.segments();
    // ::a.b.c.d (deprecated IPv4-compatible) — but not :: and ::1 themselves.
    if seg[..6].iter().all(|s| *s == 0) && !ip.is_unspecified() && !ip.is_loopback() {
        return is_forbidden_v4(embedded_v4(seg[6], seg[7]));
    }
    // 64:ff9b::/96 NAT64 well-known prefix.
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6].iter().all(|s| *s == 0) {
        return is_forbidden_v4(embedded_v4(seg[6], seg[7]));
    }
    // 2002::/16 6to4 carries the IPv4 address in the next 32 bits.
    if seg[0] == 0x2002 {
        return is_forbidden_v4(embedded_v4(seg[1], seg[2]));
    }
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00                // fc00::/7 unique local
        || (seg[0] & 0xffc0) == 0xfe80                // fe80::/10 link-local
        || (seg[0] & 0xffc0) == 0xfec0                // fec0::/10 site-local (deprecated)
        || (seg[0] == 0x2001 && seg[1] == 0x0db8)     // 2001:db8::/32 documentation
        || (seg[0] == 0x2001 && seg[1] == 0x0000)     // 2001::/32 Teredo
        || (seg[0] == 0x0100 && seg[1..4].iter().all(|s| *s == 0)) // 100::/64 discard
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(s: &str) -> bool {
        is_forbidden_ip(s.parse().unwrap())
    }

    #[test]
    fn private_and_special_v4_are_forbidden() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "192.0.0.8",
        ] {
            assert!(forbidden(ip), "{ip} must be forbidden");
        }
    }

    #[test]
    fn public_v4_is_allowed() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "151.101.1.1",
        ] {
            assert!(!forbidden(ip), "{ip} must be allowed");
        }
    }

    #[test]
    fn special_v6_is_forbidden() {
        for ip in [
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2001:db8::1",
            "2001:0:4136:e378::1",
        ] {
            assert!(forbidden(ip), "{ip} must be forbidden");
        }
    }

    #[test]
    fn public_v6_is_allowed() {
        for ip in [
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
        ] {
            assert!(!forbidden(ip), "{ip} must be allowed");
        }
    }
}
