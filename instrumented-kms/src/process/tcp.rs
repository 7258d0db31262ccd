//! This process's TCP connections, from `/proc/self/net/tcp{,6}` matched
//! against the socket inodes among `/proc/self/fd`.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// One row of `/proc/net/tcp` or `tcp6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TcpEntry {
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    pub(crate) state: &'static str,
    pub(crate) inode: u64,
}

/// Kernel TCP state names (`include/net/tcp_states.h`), as `ss` prints them
/// but with underscores.
pub(crate) fn state_name(code: u8) -> &'static str {
    match code {
        0x01 => "ESTABLISHED",
        0x02 => "SYN_SENT",
        0x03 => "SYN_RECV",
        0x04 => "FIN_WAIT1",
        0x05 => "FIN_WAIT2",
        0x06 => "TIME_WAIT",
        0x07 => "CLOSE",
        0x08 => "CLOSE_WAIT",
        0x09 => "LAST_ACK",
        0x0A => "LISTEN",
        0x0B => "CLOSING",
        0x0C => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// Parses the text of `/proc/net/tcp` or `/proc/net/tcp6`; malformed rows
/// are skipped.
pub(crate) fn parse_table(text: &str) -> Vec<TcpEntry> {
    text.lines().skip(1).filter_map(parse_row).collect()
}

fn parse_row(line: &str) -> Option<TcpEntry> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 {
        return None;
    }
    Some(TcpEntry {
        local: parse_addr(fields[1])?,
        remote: parse_addr(fields[2])?,
        state: state_name(u8::from_str_radix(fields[3], 16).ok()?),
        inode: fields[9].parse().ok()?,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:port` (IPv6). The address is
/// the kernel's in-memory bytes printed as 32-bit words in host byte order.
pub(crate) fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(bytes);
            // Dual-stack sockets show IPv4 peers as ::ffff:a.b.c.d.
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The inode of a `/proc/self/fd` link target `socket:[12345]`.
pub(crate) fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Connections counted for `kms.process`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TcpSummary {
    /// Connections on the listen port, by state (listening sockets excluded).
    pub(crate) inbound: BTreeMap<&'static str, u64>,
    /// Connections this process opened, by (peer, state).
    pub(crate) outbound: BTreeMap<(SocketAddr, &'static str), u64>,
}

/// Sorts this process's sockets (`ours`: inodes) into inbound on
/// `listen_port` and outbound. A connection whose local port is one of our
/// listening ports is inbound (to that port); only `listen_port`'s are
/// counted. Everything else that is not listening is outbound.
pub(crate) fn summarise(
    entries: &[TcpEntry],
    ours: &HashSet<u64>,
    listen_port: Option<u16>,
) -> TcpSummary {
    let mine: Vec<&TcpEntry> = entries
        .iter()
        .filter(|e| e.inode != 0 && ours.contains(&e.inode))
        .collect();
    let listening: HashSet<u16> = mine
        .iter()
        .filter(|e| e.state == "LISTEN")
        .map(|e| e.local.port())
        .chain(listen_port)
        .collect();
    let mut summary = TcpSummary::default();
    for entry in mine.iter().filter(|e| e.state != "LISTEN") {
        let port = entry.local.port();
        if listening.contains(&port) {
            if Some(port) == listen_port {
                *summary.inbound.entry(entry.state).or_default() += 1;
            }
        } else {
            *summary
                .outbound
                .entry((entry.remote, entry.state))
                .or_default() += 1;
        }
    }
    summary
}

/// Reads the tables and this process's socket inodes and summarises them.
pub(crate) fn read(listen_port: Option<u16>) -> TcpSummary {
    let mut ours = HashSet::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for entry in dir.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                if let Some(inode) = target.to_str().and_then(socket_inode) {
                    ours.insert(inode);
                }
            }
        }
    }
    let mut entries = Vec::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            entries.extend(parse_table(&text));
        }
    }
    summarise(&entries, &ours, listen_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2391 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:2391 0100007F:D431 08 00000000:00000010 00:00000000 00000000     0        0 1002 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:2391 0100007F:D432 08 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:2391 0100007F:D433 01 00000000:00000000 00:00000000 00000000     0        0 1004 1 0000000000000000 20 4 30 10 -1
   4: 0F02000A:C350 0202000A:1F40 01 00000000:00000000 00:00000000 00000000     0        0 1005 1 0000000000000000 20 4 30 10 -1
   5: 0F02000A:C351 0202000A:1F40 01 00000000:00000000 00:00000000 00000000     0        0 1006 1 0000000000000000 20 4 30 10 -1
   6: 0100007F:D431 0100007F:2391 05 00000000:00000000 00:00000000 00000000     0        0 9999 1 0000000000000000 20 4 30 10 -1
   7: 0100007F:2391 0100007F:D434 06 00000000:00000000 03:00000000 00000000     0        0 0 3 0000000000000000
   8: garbage
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 2002 1 0000000000000000 20 4 30 10 -1
   2: 000080FE00000000FF005452020000FE:C000 000080FE00000000FF005452010000FE:01BB 02 00000000:00000000 00:00000000 00000000     0        0 2003 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn parses_ipv4_rows() {
        let rows = parse_table(TCP);
        assert_eq!(rows.len(), 8, "garbage row skipped");
        assert_eq!(rows[0].local, "127.0.0.1:9105".parse().unwrap());
        assert_eq!(rows[0].state, "LISTEN");
        assert_eq!(rows[1].remote, "127.0.0.1:54321".parse().unwrap());
        assert_eq!(rows[1].state, "CLOSE_WAIT");
        assert_eq!(rows[1].inode, 1002);
        assert_eq!(rows[4].local, "10.0.2.15:50000".parse().unwrap());
        assert_eq!(rows[4].remote, "10.0.2.2:8000".parse().unwrap());
    }

    #[test]
    fn parses_ipv6_rows_and_maps_ipv4() {
        let rows = parse_table(TCP6);
        assert_eq!(rows[0].local, "[::]:8080".parse().unwrap());
        assert_eq!(rows[1].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(rows[1].remote, "127.0.0.1:40960".parse().unwrap());
        assert_eq!(
            rows[2].remote,
            "[fe80::5254:ff:fe00:1]:443".parse().unwrap()
        );
        assert_eq!(rows[2].state, "SYN_SENT");
    }

    #[test]
    fn sorts_our_sockets_into_inbound_and_outbound() {
        let rows = parse_table(TCP);
        // 9999 is someone else's socket; TIME_WAIT rows have inode 0.
        let ours: HashSet<u64> = [1001, 1002, 1003, 1004, 1005, 1006].into();
        let s = summarise(&rows, &ours, Some(9105));
        assert_eq!(s.inbound.get("CLOSE_WAIT"), Some(&2));
        assert_eq!(s.inbound.get("ESTABLISHED"), Some(&1));
        assert_eq!(s.inbound.get("LISTEN"), None);
        assert_eq!(
            s.outbound
                .get(&("10.0.2.2:8000".parse().unwrap(), "ESTABLISHED")),
            Some(&2)
        );
        assert_eq!(s.outbound.len(), 1);

        // Without a configured port, inbound connections to our listener are
        // not mistaken for outbound ones.
        let s = summarise(&rows, &ours, None);
        assert!(s.inbound.is_empty());
        assert_eq!(s.outbound.len(), 1);
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }
}
