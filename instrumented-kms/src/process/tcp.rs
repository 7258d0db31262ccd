//! This process's TCP connections, from `/proc/self/net/tcp{,6}` matched
//! against the socket inodes among `/proc/self/fd`, and the listen port's
//! accept queue, read from the same tables whatever fds the process holds.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::FdReserve;

/// One row of `/proc/net/tcp` or `tcp6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TcpEntry {
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    pub(crate) state: &'static str,
    /// `tx_queue`; for a LISTEN socket, its maximum accept backlog.
    pub(crate) tx_queue: u64,
    /// `rx_queue`; for a LISTEN socket, its current accept queue length.
    pub(crate) rx_queue: u64,
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
    let (tx, rx) = fields[4].split_once(':')?;
    Some(TcpEntry {
        local: parse_addr(fields[1])?,
        remote: parse_addr(fields[2])?,
        state: state_name(u8::from_str_radix(fields[3], 16).ok()?),
        tx_queue: u64::from_str_radix(tx, 16).ok()?,
        rx_queue: u64::from_str_radix(rx, 16).ok()?,
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
    /// The listen port's accept queue length now (LISTEN sockets' `rx_queue`,
    /// summed over IPv4 and IPv6); `None` when no socket listens on it.
    pub(crate) listen_queue: Option<u64>,
    /// The listen port's maximum accept backlog (LISTEN sockets' `tx_queue`).
    pub(crate) listen_backlog: Option<u64>,
    /// Connections on the listen port that the process does not hold (inode
    /// 0 or not among its fds): queued for an accept that has not happened.
    /// `None` when the process's fds could not be read.
    pub(crate) unaccepted: Option<BTreeMap<&'static str, u64>>,
}

/// States of a connection waiting in a listener's accept queue: the
/// handshake is complete; the client may have given up since (`CLOSE_WAIT`).
/// Sockets the process closed itself (`FIN_WAIT*`, `TIME_WAIT`, `LAST_ACK`)
/// also have inode 0 and are not counted.
const QUEUED_STATES: &[&str] = &["ESTABLISHED", "CLOSE_WAIT"];

/// The accept queue of `port`: (queue length, backlog) summed over the
/// LISTEN sockets on it, preferring the process's own.
fn listen_queue(
    entries: &[TcpEntry],
    ours: Option<&HashSet<u64>>,
    port: u16,
) -> Option<(u64, u64)> {
    let listening: Vec<&TcpEntry> = entries
        .iter()
        .filter(|e| e.state == "LISTEN" && e.local.port() == port)
        .collect();
    let own: Vec<&TcpEntry> = listening
        .iter()
        .copied()
        .filter(|e| ours.is_some_and(|o| o.contains(&e.inode)))
        .collect();
    let chosen = if own.is_empty() { listening } else { own };
    (!chosen.is_empty()).then(|| {
        chosen
            .iter()
            .fold((0, 0), |(q, b), e| (q + e.rx_queue, b + e.tx_queue))
    })
}

/// Connections to `port` in [`QUEUED_STATES`] that no fd of ours holds.
fn unaccepted(entries: &[TcpEntry], ours: &HashSet<u64>, port: u16) -> BTreeMap<&'static str, u64> {
    let mut counts = BTreeMap::new();
    for e in entries.iter().filter(|e| {
        e.local.port() == port
            && QUEUED_STATES.contains(&e.state)
            && (e.inode == 0 || !ours.contains(&e.inode))
    }) {
        *counts.entry(e.state).or_default() += 1;
    }
    counts
}

/// Sorts this process's sockets (`ours`: inodes) into inbound on
/// `listen_port` and outbound. A connection whose local port is one of our
/// listening ports is inbound (to that port); only `listen_port`'s are
/// counted. Everything else that is not listening is outbound.
///
/// `ours` is `None` when the process's fds could not be read: then nothing
/// is counted as ours, and `unaccepted` is left unknown.
pub(crate) fn summarise(
    entries: &[TcpEntry],
    ours: Option<&HashSet<u64>>,
    listen_port: Option<u16>,
) -> TcpSummary {
    let empty = HashSet::new();
    let known = ours.is_some();
    let ours = ours.unwrap_or(&empty);
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
    if let Some(port) = listen_port {
        if let Some((queue, backlog)) = listen_queue(entries, known.then_some(ours), port) {
            summary.listen_queue = Some(queue);
            // Linux prints a listener's tx_queue as 0 (its backlog is only in
            // sock_diag); 0 is "not reported", never a real backlog.
            summary.listen_backlog = (backlog > 0).then_some(backlog);
        }
        summary.unaccepted = known.then(|| unaccepted(entries, ours, port));
    }
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

/// Reads the tables and this process's socket inodes and summarises them;
/// every file is opened through `reserve` (see [`FdReserve`]).
pub(crate) fn read(listen_port: Option<u16>, reserve: &mut FdReserve) -> TcpSummary {
    let ours = reserve
        .open(|| std::fs::read_dir("/proc/self/fd"))
        .ok()
        .map(|dir| {
            dir.flatten()
                .filter_map(|entry| std::fs::read_link(entry.path()).ok())
                .filter_map(|target| target.to_str().and_then(socket_inode))
                .collect::<HashSet<u64>>()
        });
    let mut entries = Vec::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        if let Ok(text) = reserve.open(|| std::fs::read_to_string(table)) {
            entries.extend(parse_table(&text));
        }
    }
    summarise(&entries, ours.as_ref(), listen_port)
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
        let s = summarise(&rows, Some(&ours), Some(9105));
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
        let s = summarise(&rows, Some(&ours), None);
        assert!(s.inbound.is_empty());
        assert_eq!(s.outbound.len(), 1);
        assert_eq!(s.listen_queue, None);
        assert_eq!(s.unaccepted, None);
    }

    const QUEUED: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2391 00000000:0000 0A 00000080:00000003 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:2391 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:2391 0100007F:D432 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:2391 0100007F:D433 08 00000000:00000001 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
   4: 0100007F:2391 0100007F:D434 01 00000000:00000000 00:00000000 00000000     0        0 1004 1 0000000000000000 20 4 30 10 -1
   5: 0100007F:2391 0100007F:D435 06 00000000:00000000 03:00000000 00000000     0        0 0 3 0000000000000000
   6: 0100007F:2391 0100007F:D436 01 00000000:00000000 00:00000000 00000000     0        0 7777 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn the_accept_queue_and_connections_never_accepted() {
        let rows = parse_table(QUEUED);
        assert_eq!((rows[0].tx_queue, rows[0].rx_queue), (128, 3));
        let ours: HashSet<u64> = [1001, 1004].into();
        let s = summarise(&rows, Some(&ours), Some(9105));
        assert_eq!(s.listen_queue, Some(3));
        assert_eq!(s.listen_backlog, Some(128));
        // Two queued ESTABLISHED (inode 0) and one held by someone else;
        // one whose client gave up; TIME_WAIT is a connection we closed.
        let unaccepted = s.unaccepted.unwrap();
        assert_eq!(unaccepted.get("ESTABLISHED"), Some(&3));
        assert_eq!(unaccepted.get("CLOSE_WAIT"), Some(&1));
        assert_eq!(unaccepted.get("TIME_WAIT"), None);
        assert_eq!(s.inbound.get("ESTABLISHED"), Some(&1));

        // Without our fds, the queue is still read; what is unaccepted is unknown.
        let s = summarise(&rows, None, Some(9105));
        assert_eq!(s.listen_queue, Some(3));
        assert_eq!(s.unaccepted, None);
        // A port nobody listens on has no queue.
        assert_eq!(summarise(&rows, Some(&ours), Some(1)).listen_queue, None);
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }
}
