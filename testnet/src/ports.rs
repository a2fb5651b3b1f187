//! Fixed loopback ports for processes that must be found at a port chosen before they start
//! (the nodes of `canal testnet up`, which restart where they were and are each other's
//! bootstrap peers, and the NATS servers of `canal bench --compare-nats`).
//!
//! A port taken by binding port 0 and letting go comes from the kernel's ephemeral range,
//! the same range every outgoing connection's local port comes from: between the pick and
//! the process's own bind, a node that already started and dials its peers can take it as a
//! local port, and the later node fails with "address in use". So the ports come from below
//! the ephemeral range, which outgoing connections never use, and each stays bound here
//! (so no other pick in this process takes it) until its process is about to start.

use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::net::TcpListener;

/// The lowest port handed out: below it are the ports of well-known services.
const LOWEST: u16 = 10_000;
/// The kernel's default ephemeral range, when `/proc` cannot be read.
const DEFAULT_EPHEMERAL: (u16, u16) = (32_768, 60_999);
/// A range with fewer free ports than this is not used; the ephemeral range is, instead.
const MIN_RANGE: u32 = 1_000;

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| parse_range(&t))
        .unwrap_or(DEFAULT_EPHEMERAL)
}

/// `"32768\t60999\n"` as a range, `None` if it is not two ports, lowest first.
fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(|w| w.parse::<u16>().ok());
    match (it.next()??, it.next()??, it.next()) {
        (lo, hi, None) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// Where fixed ports are picked from, given the ephemeral range: the ports below it (from
/// [`LOWEST`]), else those above it, else `None` (the ephemeral range covers nearly every
/// port: fall back to the kernel's pick).
fn fixed_range((lo, hi): (u16, u16)) -> Option<(u16, u16)> {
    if u32::from(lo) > u32::from(LOWEST) + MIN_RANGE {
        Some((LOWEST, lo - 1))
    } else if u32::from(u16::MAX - hi) > MIN_RANGE {
        Some((hi + 1, u16::MAX))
    } else {
        None
    }
}

/// Ports bound on 127.0.0.1 by this process until [`Reserved::release`] lets a process
/// bind them.
#[derive(Debug, Default)]
pub struct Reserved {
    held: BTreeMap<u16, TcpListener>,
}

impl Reserved {
    /// Reserves `n` distinct free ports outside the ephemeral range (see the module).
    pub fn new(n: usize) -> anyhow::Result<Reserved> {
        let mut r = Reserved::default();
        match fixed_range(ephemeral_range()) {
            Some(range) => r.fill(n, range, start_offset())?,
            None => {
                for _ in 0..n {
                    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind a local port")?;
                    r.held.insert(l.local_addr()?.port(), l);
                }
            }
        }
        Ok(r)
    }

    /// Binds `n` more ports of `range`, trying them in order from `offset` on (wrapping).
    fn fill(&mut self, n: usize, (lo, hi): (u16, u16), offset: u32) -> anyhow::Result<()> {
        let mut got = 0;
        for port in order((lo, hi), offset) {
            if got == n {
                return Ok(());
            }
            if self.held.contains_key(&port) {
                continue;
            }
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                self.held.insert(port, l);
                got += 1;
            }
        }
        if got < n {
            bail!("only {got} of {n} ports between {lo} and {hi} are free on 127.0.0.1");
        }
        Ok(())
    }

    /// The reserved ports, sorted.
    pub fn ports(&self) -> Vec<u16> {
        self.held.keys().copied().collect()
    }

    /// Lets go of `ports`, so the process about to start can bind them.
    pub fn release(&mut self, ports: &[u16]) {
        for p in ports {
            self.held.remove(p);
        }
    }
}

/// Every port of `range` once, from `offset` (modulo its size) on, wrapping to its start.
fn order((lo, hi): (u16, u16), offset: u32) -> impl Iterator<Item = u16> {
    let size = u32::from(hi) - u32::from(lo) + 1;
    (0..size).map(move |step| (u32::from(lo) + (offset % size + step) % size) as u16)
}

/// Where a pick starts in the range: different for processes picking at once (two testnets,
/// or a bench beside one), so they do not try the same ports in the same order.
fn start_offset() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().wrapping_mul(2_654_435_761)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_reads_as_the_kernel_writes_it() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32_768, 60_999)));
        assert_eq!(parse_range("1024 65535"), Some((1024, 65_535)));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range("32768"), None);
        assert_eq!(parse_range("a b"), None);
        assert_eq!(parse_range("1 2 3"), None);
    }

    #[test]
    fn fixed_ports_come_from_below_the_ephemeral_range_else_above_it() {
        assert_eq!(fixed_range((32_768, 60_999)), Some((10_000, 32_767)));
        assert_eq!(fixed_range((10_500, 60_999)), Some((61_000, 65_535)));
        assert_eq!(fixed_range((1024, 65_535)), None);
    }

    #[test]
    fn reserved_ports_are_distinct_held_and_outside_the_ephemeral_range() {
        let (lo, hi) = ephemeral_range();
        let r = Reserved::new(40).unwrap();
        let ports = r.ports();
        assert_eq!(ports.len(), 40);
        if fixed_range((lo, hi)).is_some() {
            assert!(ports.iter().all(|p| *p < lo || *p > hi), "{ports:?}");
        }
        // Held: nothing else binds them until released.
        assert!(TcpListener::bind(("127.0.0.1", ports[0])).is_err());
        let mut r = r;
        r.release(&ports[..1]);
        assert!(TcpListener::bind(("127.0.0.1", ports[0])).is_ok());
    }

    #[test]
    fn a_pick_tries_every_port_once_from_its_offset_wrapping() {
        assert_eq!(
            order((10, 14), 3).collect::<Vec<_>>(),
            vec![13, 14, 10, 11, 12]
        );
        assert_eq!(
            order((10, 14), 8).collect::<Vec<_>>(),
            vec![13, 14, 10, 11, 12]
        );
        assert_eq!(order((7, 7), u32::MAX).collect::<Vec<_>>(), vec![7]);
        assert_eq!(order((0, u16::MAX), 0).count(), 65_536);
    }

    #[test]
    fn a_port_taken_elsewhere_is_skipped_and_named_when_none_is_left() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut r = Reserved::default();
        let e = r.fill(1, (port, port), 0).unwrap_err().to_string();
        assert!(e.contains("only 0 of 1 ports"), "{e}");
        drop(taken);
        r.fill(1, (port, port), 0).unwrap();
        assert_eq!(r.ports(), vec![port]);
    }
}
