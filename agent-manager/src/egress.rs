//! The egress allow-list: the destinations an agent may reach through agentd's egress
//! proxy, and the proxy variables its container gets.
//!
//! An entry is one of:
//! - `host`: the host name (or IP address) on ports 443 and 80 ([`DEFAULT_PORTS`]);
//! - `host:port`: that port only;
//! - `*.example.com` (with or without `:port`): every name below `example.com`, not
//!   `example.com` itself;
//! - an IPv6 address as `[::1]` or `[::1]:port` (bare, `::1`, when without a port).
//!
//! Names are matched as the client named them, case-insensitively, never by what they
//! resolve to: an entry `10.0.0.5` does not allow a name that resolves to 10.0.0.5, and an
//! entry `example.com` allows `EXAMPLE.com` and `example.com.` (one trailing dot, the same
//! name in DNS), but not `127.1` or other shorthand forms of an address (a name whose
//! last label is all digits is no host name).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The ports an entry without a port allows: HTTPS and HTTP.
pub const DEFAULT_PORTS: [u16; 2] = [443, 80];

/// The most entries an allow-list may have.
pub const MAX_ENTRIES: usize = 256;

/// The host part of an entry or a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    /// A host name, lowercase, without a trailing dot.
    Name(String),
    /// `*.example.com`, kept as `.example.com`.
    Suffix(String),
    /// An IP address.
    Ip(IpAddr),
}

/// One allow-list entry, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    host: Host,
    /// `None`: [`DEFAULT_PORTS`].
    port: Option<u16>,
}

/// Where a client asked to go, as it named it: a valid host name (lowercase, no trailing
/// dot) or an IP address, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    host: Host,
    port: u16,
}

/// Checks a host name: labels of 1 to 63 from a-z, 0-9 and '-' (not at either end), at
/// most 253 characters, the last label not all digits. `name` is lowercase already.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the host name is empty".into());
    }
    if name.ends_with('.') {
        return Err("write the host name without a trailing dot".into());
    }
    if name.len() > 253 {
        return Err("a host name has at most 253 characters".into());
    }
    for label in name.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{label:?} is not a host name label: use 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'"
            ));
        }
    }
    if name.rsplit('.').next().is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit())) {
        return Err("a host name's last label is not all digits; write an IP address in full (1.2.3.4)".into());
    }
    Ok(())
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("{text:?} is not a port: use 1 to 65535")),
    }
}

/// Splits `host[:port]`, `[v6]` or `[v6]:port`; a bare IPv6 address has no port.
fn split_host_port(text: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("an IPv6 address in brackets needs its closing ']'")?;
        return match after {
            "" => Ok((inside, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((inside, Some(port))),
                None => Err(format!("unexpected {after:?} after the IPv6 address; write [ADDRESS]:PORT")),
            },
        };
    }
    if text.parse::<IpAddr>().is_ok() {
        return Ok((text, None));
    }
    match text.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => {
            Err("write an IPv6 address with a port in brackets: [ADDRESS]:PORT".into())
        }
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((text, None)),
    }
}

impl FromStr for EgressRule {
    type Err = String;

    fn from_str(entry: &str) -> Result<Self, String> {
        if entry.is_empty() || entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("an entry is HOST, HOST:PORT or *.DOMAIN[:PORT], without spaces".into());
        }
        if entry.contains(['/', '@', '?', '#']) {
            return Err("an entry is a host (HOST or HOST:PORT), not a URL".into());
        }
        let (host, port) = split_host_port(entry)?;
        let port = port.map(parse_port).transpose()?;
        let host = host.to_ascii_lowercase();
        let host = if let Ok(ip) = host.parse::<IpAddr>() {
            Host::Ip(ip)
        } else if let Some(domain) = host.strip_prefix("*.") {
            check_name(domain)?;
            Host::Suffix(format!(".{domain}"))
        } else if host.contains('*') {
            return Err("a wildcard is only allowed as the first label: *.example.com".into());
        } else {
            check_name(&host)?;
            Host::Name(host)
        };
        Ok(Self { host, port })
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.host, self.port) {
            (Host::Ip(IpAddr::V6(ip)), Some(port)) => write!(f, "[{ip}]:{port}"),
            (Host::Ip(ip), None) => write!(f, "{ip}"),
            (Host::Ip(ip), Some(port)) => write!(f, "{ip}:{port}"),
            (Host::Name(name), None) => f.write_str(name),
            (Host::Name(name), Some(port)) => write!(f, "{name}:{port}"),
            (Host::Suffix(suffix), None) => write!(f, "*{suffix}"),
            (Host::Suffix(suffix), Some(port)) => write!(f, "*{suffix}:{port}"),
        }
    }
}

impl EgressRule {
    /// Whether this entry allows `destination`.
    pub fn allows(&self, destination: &Destination) -> bool {
        let port_ok = match self.port {
            Some(port) => port == destination.port,
            None => DEFAULT_PORTS.contains(&destination.port),
        };
        let host_ok = match (&self.host, &destination.host) {
            (Host::Name(rule), Host::Name(name)) => rule == name,
            (Host::Suffix(suffix), Host::Name(name)) => name.ends_with(suffix.as_str()),
            (Host::Ip(rule), Host::Ip(ip)) => rule == ip,
            _ => false,
        };
        port_ok && host_ok
    }
}

impl Destination {
    /// The destination a client named: `host` as in its request (a name, an IPv4
    /// address, or an IPv6 address with or without brackets), and `port`. Lowercased; one
    /// trailing dot is dropped. Anything that is not a valid host name or IP address is
    /// an error that says why.
    pub fn new(host: &str, port: u16) -> Result<Self, String> {
        if port == 0 {
            return Err("port 0 is no destination".into());
        }
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Self { host: Host::Ip(ip), port });
        }
        let name = host.to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name);
        check_name(name)?;
        Ok(Self { host: Host::Name(name.to_owned()), port })
    }

    /// The host to resolve (a name) or connect to (an address), without brackets.
    pub fn host(&self) -> String {
        match &self.host {
            Host::Name(name) | Host::Suffix(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }

    /// The IP address the client named, if it named one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.host {
            Host::Ip(ip) => Some(ip),
            _ => None,
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host(), self.port),
        }
    }
}

/// An agent's parsed allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressList(Vec<EgressRule>);

impl EgressList {
    /// Parses every entry; the first bad one is an error naming it and why.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        if entries.len() > MAX_ENTRIES {
            return Err(format!("{} entries; at most {MAX_ENTRIES}", entries.len()));
        }
        entries
            .iter()
            .map(|entry| entry.parse::<EgressRule>().map_err(|why| format!("{entry:?}: {why}")))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Whether any entry allows `destination`.
    pub fn allows(&self, destination: &Destination) -> bool {
        self.0.iter().any(|rule| rule.allows(destination))
    }

    /// Whether the list is empty (nothing is allowed).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The variables that point a container's HTTP clients at the egress proxy on `gateway`
/// at `port`, and keep the gateway itself (the model gateway) and loopback direct.
pub fn proxy_env(gateway: IpAddr, port: u16) -> BTreeMap<String, String> {
    let url = match gateway {
        IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
        IpAddr::V4(ip) => format!("http://{ip}:{port}"),
    };
    let no_proxy = format!("{gateway},localhost,127.0.0.1");
    let mut env = BTreeMap::new();
    for key in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
        env.insert(key.to_owned(), url.clone());
    }
    for key in ["NO_PROXY", "no_proxy"] {
        env.insert(key.to_owned(), no_proxy.clone());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> EgressList {
        EgressList::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>()).expect("valid list")
    }

    fn dest(host: &str, port: u16) -> Destination {
        Destination::new(host, port).unwrap_or_else(|e| panic!("{host}:{port}: {e}"))
    }

    #[test]
    fn entries_parse_and_print_canonically() {
        for (entry, shown) in [
            ("Example.COM", "example.com"),
            ("example.com:8443", "example.com:8443"),
            ("*.Example.com", "*.example.com"),
            ("*.example.com:22", "*.example.com:22"),
            ("10.0.0.5", "10.0.0.5"),
            ("10.0.0.5:5432", "10.0.0.5:5432"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("[::1]:8080", "[::1]:8080"),
            ("localhost", "localhost"),
        ] {
            let rule: EgressRule = entry.parse().unwrap_or_else(|e| panic!("{entry}: {e}"));
            assert_eq!(rule.to_string(), shown, "{entry}");
        }
    }

    #[test]
    fn bad_entries_say_why() {
        for (entry, why) in [
            ("", "without spaces"),
            ("exa mple.com", "without spaces"),
            ("https://example.com", "not a URL"),
            ("example.com.", "trailing dot"),
            ("example.com:0", "not a port"),
            ("example.com:70000", "not a port"),
            ("example.com:http", "not a port"),
            ("ex_ample.com", "not a host name label"),
            ("-example.com", "not a host name label"),
            ("a..b", "not a host name label"),
            ("127.1", "last label is not all digits"),
            ("foo.*.example.com", "first label"),
            ("*", "first label"),
            ("::1:http", "brackets"),
            ("[::1", "closing"),
            ("[::1]x", "after the IPv6"),
            ("user@example.com", "not a URL"),
        ] {
            let err = entry.parse::<EgressRule>().expect_err(entry);
            assert!(err.contains(why), "{entry}: {err}");
        }
        let err = EgressList::parse(&["ok.example".into(), "bad host".into()]).expect_err("bad list");
        assert!(err.starts_with("\"bad host\""), "{err}");
    }

    #[test]
    fn a_host_allows_https_and_http_only_and_host_port_that_port_only() {
        let rules = list(&["example.com", "db.internal:5432"]);
        assert!(rules.allows(&dest("example.com", 443)));
        assert!(rules.allows(&dest("example.com", 80)));
        assert!(!rules.allows(&dest("example.com", 22)));
        assert!(rules.allows(&dest("db.internal", 5432)));
        assert!(!rules.allows(&dest("db.internal", 443)));
        assert!(!rules.allows(&dest("other.com", 443)));
    }

    #[test]
    fn names_match_case_insensitively_with_no_dot_or_suffix_tricks() {
        let rules = list(&["example.com", "*.corp.example"]);
        assert!(rules.allows(&dest("EXAMPLE.com", 443)));
        assert!(rules.allows(&dest("example.com.", 443)), "one trailing dot is the same name");
        assert!(Destination::new("example.com..", 443).is_err());
        assert!(!rules.allows(&dest("example.com.evil.net", 443)));
        assert!(!rules.allows(&dest("notexample.com", 443)));
        assert!(!rules.allows(&dest("www.example.com", 443)), "a name does not allow its subdomains");
        assert!(rules.allows(&dest("git.corp.example", 443)));
        assert!(rules.allows(&dest("a.b.corp.example", 443)));
        assert!(!rules.allows(&dest("corp.example", 443)), "*.domain does not allow the domain itself");
        assert!(!rules.allows(&dest("evilcorp.example", 443)));
        assert!(!rules.allows(&dest("corp.example.evil.net", 443)));
    }

    #[test]
    fn addresses_match_addresses_only() {
        let rules = list(&["127.0.0.1:8080", "[::1]:9090"]);
        assert!(rules.allows(&dest("127.0.0.1", 8080)));
        assert!(!rules.allows(&dest("127.0.0.1", 8081)));
        assert!(rules.allows(&dest("[::1]", 9090)));
        assert!(rules.allows(&dest("::1", 9090)));
        assert!(!rules.allows(&dest("localhost", 8080)), "a name is not matched by what it resolves to");
        // Shorthand forms of an address are neither addresses nor names.
        for trick in ["127.1", "0x7f.0.0.1", "2130706433", "127.0.0.1.", "[127.0.0.1]x"] {
            assert!(Destination::new(trick, 8080).is_err(), "{trick}");
        }
        assert!(!rules.allows(&dest("::ffff:127.0.0.1", 8080)));
    }

    #[test]
    fn an_empty_list_allows_nothing() {
        let rules = list(&[]);
        assert!(rules.is_empty());
        assert!(!rules.allows(&dest("example.com", 443)));
    }

    #[test]
    fn proxy_variables_point_at_the_gateway_and_keep_it_direct() {
        let env = proxy_env("172.17.0.1".parse().expect("ip"), 7008);
        for key in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
            assert_eq!(env[key], "http://172.17.0.1:7008", "{key}");
        }
        for key in ["NO_PROXY", "no_proxy"] {
            assert_eq!(env[key], "172.17.0.1,localhost,127.0.0.1", "{key}");
        }
        let env = proxy_env("fd00::1".parse().expect("ip"), 7008);
        assert_eq!(env["HTTPS_PROXY"], "http://[fd00::1]:7008");
    }
}
