//! Blocks of f32 between processes over TCP: the data plane of CPU workers (and of GPUs
//! without NCCL).
//!
//! A link is one TCP connection between two ranks. It opens with a handshake that names the
//! job, the generation and both ranks, so that a process of another job (or a stale process of
//! an earlier generation) cannot join by mistake. Every block then travels in a frame
//! `"AXF1" | sequence (u64) | values (u32) | values x f32`, all little-endian; the receiver knows
//! how many values to expect and checks the header before reading the payload, so a malformed
//! frame is an error that names the peer, never an allocation of its choosing. Every read and
//! write has the job's peer timeout: a dead or silent peer is an error, not a hang.

use super::{Link, Traffic};
use anyhow::{bail, Context};
use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[cfg(target_endian = "big")]
compile_error!(
    "the TCP data plane sends f32 in the host's byte order, which must be little-endian"
);

const FRAME_MAGIC: &[u8; 4] = b"AXF1";
const FRAME_HEADER: usize = 16;
const HELLO_MAGIC: &[u8; 4] = b"AXH1";
const HELLO_LEN: usize = 48;
/// Bumped when the framing changes, so that mismatched binaries refuse each other.
const PROTOCOL: u32 = 2;
/// The binary's version as the handshake carries it (zero-padded, at most 16 bytes).
const VERSION_FIELD: usize = 16;
const ACCEPTED: &[u8; 4] = b"AXOK";

/// Who may join a mesh: a digest of the job id and configuration, the generation, and the
/// job's secret (a key derived from the job token), which both ends prove they hold without
/// sending it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MeshKey {
    pub job: u64,
    pub generation: u64,
    pub secret: [u8; 32],
}

impl std::fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("MeshKey")
            .field("job", &self.job)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl MeshKey {
    /// The key of a job whose token is `token` (empty: a job without a token).
    pub fn new(job: u64, generation: u64, token: &str) -> Self {
        MeshKey {
            job,
            generation,
            secret: blake3::derive_key("alexnet data plane v1", token.as_bytes()),
        }
    }

    fn mac(&self, role: &[u8], hello: &[u8], nonce: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.secret);
        h.update(role).update(hello).update(nonce);
        *h.finalize().as_bytes()
    }
}

const NONCE: usize = 16;

fn nonce() -> anyhow::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(|e| anyhow::anyhow!("no randomness for the handshake: {e}"))?;
    Ok(n)
}

/// Compares two MACs in constant time.
fn same(a: &[u8; 32], b: &[u8]) -> bool {
    b.len() == 32 && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One TCP connection to a peer rank.
pub struct TcpLink {
    stream: TcpStream,
    peer_rank: usize,
    peer_addr: String,
    timeout: Duration,
    seq_out: u64,
    seq_in: u64,
    traffic: Traffic,
}

/// A data-plane failure caused by a peer (gone, silent, or sending nonsense): the worker
/// reports the peer's rank, so that the coordinator blames the rank that went away.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PeerError {
    pub rank: usize,
    pub message: String,
}

fn peer_error(rank: usize, message: String) -> anyhow::Error {
    PeerError { rank, message }.into()
}

fn io_context(e: std::io::Error, peer: usize, addr: &str, timeout: Duration) -> anyhow::Error {
    let message = match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
            "rank {peer} ({addr}) sent nothing for {timeout:?}: it stopped or the link is cut \
             (the limit is the job's peer timeout)"
        ),
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => format!(
            "rank {peer} ({addr}) closed the connection: it has probably failed (see its log)"
        ),
        _ => format!("link to rank {peer} ({addr}): {e}"),
    };
    peer_error(peer, message)
}

impl TcpLink {
    fn new(stream: TcpStream, peer_rank: usize, timeout: Duration) -> anyhow::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let peer_addr = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        Ok(TcpLink {
            stream,
            peer_rank,
            peer_addr,
            timeout,
            seq_out: 0,
            seq_in: 0,
            traffic: Traffic {
                overhead_bytes: HELLO_LEN as u64,
                ..Traffic::default()
            },
        })
    }

    pub fn peer_rank(&self) -> usize {
        self.peer_rank
    }

    /// The connection itself, handshake done (for tools and tests that speak the framing by
    /// hand).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    fn err(&self, e: std::io::Error) -> anyhow::Error {
        io_context(e, self.peer_rank, &self.peer_addr, self.timeout)
    }

    fn write_frame(mut stream: &TcpStream, seq: u64, values: &[f32]) -> std::io::Result<()> {
        let mut header = [0u8; FRAME_HEADER];
        header[..4].copy_from_slice(FRAME_MAGIC);
        header[4..12].copy_from_slice(&seq.to_le_bytes());
        header[12..].copy_from_slice(&(values.len() as u32).to_le_bytes());
        stream.write_all(&header)?;
        stream.write_all(bytemuck::cast_slice(values))?;
        stream.flush()
    }

    fn read_frame(&self, seq: u64, expect: usize) -> anyhow::Result<Vec<f32>> {
        let mut stream = &self.stream;
        let mut header = [0u8; FRAME_HEADER];
        stream.read_exact(&mut header).map_err(|e| self.err(e))?;
        let peer = self.peer_rank;
        check_frame_header(&header, seq, expect).map_err(|problem| {
            peer_error(peer, format!("rank {peer} ({}) {problem}", self.peer_addr))
        })?;
        // Only now, with the size known to be the expected one, is memory taken.
        let mut values = vec![0f32; expect];
        stream
            .read_exact(bytemuck::cast_slice_mut(&mut values))
            .map_err(|e| self.err(e))?;
        Ok(values)
    }
}

/// Checks a frame header against the block that is due: its sequence number and its size.
/// Returns what is wrong (to follow "rank N (address) "), never panics.
pub fn check_frame_header(header: &[u8], seq: u64, expect: usize) -> Result<(), String> {
    if header.len() != FRAME_HEADER {
        return Err(format!("sent a frame header of {} bytes", header.len()));
    }
    if &header[..4] != FRAME_MAGIC {
        return Err("sent a malformed frame header".into());
    }
    let got_seq = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(header[12..].try_into().expect("4 bytes")) as usize;
    if got_seq != seq {
        return Err(format!(
            "sent block {got_seq} where block {seq} was due: the ranks are out of step (or the frame was replayed)"
        ));
    }
    if count != expect {
        return Err(format!(
            "sent {count} values where {expect} were due: do both run the same network and batch?"
        ));
    }
    Ok(())
}

impl TcpLink {
    /// Sends one block (the ring's steps send to one peer and receive from another).
    pub fn send(&mut self, values: &[f32]) -> anyhow::Result<()> {
        Self::write_frame(&self.stream, self.seq_out, values).map_err(|e| self.err(e))?;
        self.seq_out += 1;
        self.traffic.sent_bytes += 4 * values.len() as u64;
        self.traffic.messages += 1;
        self.traffic.overhead_bytes += FRAME_HEADER as u64;
        Ok(())
    }

    /// Receives one block of `expect` values.
    pub fn recv(&mut self, expect: usize) -> anyhow::Result<Vec<f32>> {
        let values = self.read_frame(self.seq_in, expect)?;
        self.seq_in += 1;
        self.traffic.received_bytes += 4 * expect as u64;
        Ok(values)
    }
}

impl Link for TcpLink {
    fn swap(&mut self, mine: &[f32], expect: usize) -> anyhow::Result<Vec<f32>> {
        let (seq_out, seq_in) = (self.seq_out, self.seq_in);
        let this = &*self;
        let (sent, received) = std::thread::scope(|s| {
            // Write on a second thread: two peers that both wrote first would fill each
            // other's socket buffers and wait forever.
            let writer = s.spawn(move || Self::write_frame(&this.stream, seq_out, mine));
            let received = this.read_frame(seq_in, expect);
            (writer.join().expect("the writer thread panicked"), received)
        });
        let received = received?;
        sent.map_err(|e| self.err(e))?;
        self.seq_out += 1;
        self.seq_in += 1;
        self.traffic.sent_bytes += 4 * mine.len() as u64;
        self.traffic.received_bytes += 4 * expect as u64;
        self.traffic.messages += 1;
        self.traffic.overhead_bytes += FRAME_HEADER as u64;
        Ok(received)
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }
}

fn hello(key: MeshKey, from: usize, to: usize) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..4].copy_from_slice(HELLO_MAGIC);
    h[4..8].copy_from_slice(&PROTOCOL.to_le_bytes());
    h[8..16].copy_from_slice(&key.job.to_le_bytes());
    h[16..24].copy_from_slice(&key.generation.to_le_bytes());
    h[24..28].copy_from_slice(&(from as u32).to_le_bytes());
    h[28..32].copy_from_slice(&(to as u32).to_le_bytes());
    let v = crate::proto::VERSION.as_bytes();
    let n = v.len().min(VERSION_FIELD);
    h[32..32 + n].copy_from_slice(&v[..n]);
    h
}

/// Checks a data-plane handshake's hello against this rank's mesh; returns the sender's rank.
/// Never panics, whatever the bytes.
pub fn parse_hello(h: &[u8], key: &MeshKey, me: usize, waiting: &[usize]) -> anyhow::Result<usize> {
    if h.len() != HELLO_LEN {
        bail!("a handshake of {} bytes", h.len());
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&h[r]);
        u64::from_le_bytes(b)
    };
    if &h[..4] != HELLO_MAGIC {
        bail!("not an alexnet data-plane handshake");
    }
    if word(4..8) != PROTOCOL as u64 {
        bail!(
            "data-plane protocol {} (this binary speaks {PROTOCOL}): mixed versions",
            word(4..8)
        );
    }
    if word(8..16) != key.job {
        bail!("the peer belongs to another job");
    }
    if word(16..24) != key.generation {
        bail!(
            "the peer is in generation {}, this rank in {}",
            word(16..24),
            key.generation
        );
    }
    let (from, to) = (word(24..28) as usize, word(28..32) as usize);
    if to != me || !waiting.contains(&from) {
        bail!("unexpected handshake from rank {from} to rank {to}");
    }
    let mine = hello(*key, 0, 0);
    if h[32..] != mine[32..] {
        let text = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .trim_end_matches('\0')
                .to_string()
        };
        bail!(
            "rank {from} runs alexnet {}, this rank {}: run the same binary on every host",
            text(&h[32..]),
            text(&mine[32..])
        );
    }
    Ok(from)
}

/// The TCP links of one rank to the peers it exchanges with.
pub struct TcpMesh;

impl TcpMesh {
    /// Connects rank `me` to each rank in `needed`: ranks above `me` connect to this rank's
    /// `listener`, and this rank connects to the listeners (`addrs`) of the ranks below it.
    /// Connections that do not present `key` and the right ranks are refused and logged; the
    /// mesh fails if a needed peer has not joined within `timeout`.
    pub fn connect(
        me: usize,
        listener: &TcpListener,
        addrs: &BTreeMap<usize, String>,
        needed: &[usize],
        key: MeshKey,
        timeout: Duration,
    ) -> anyhow::Result<HashMap<usize, TcpLink>> {
        let deadline = Instant::now() + timeout;
        let mut links = HashMap::new();
        for &peer in needed.iter().filter(|&&p| p < me) {
            let addr = addrs
                .get(&peer)
                .with_context(|| format!("no data-plane address for rank {peer}"))?;
            links.insert(peer, Self::dial(me, peer, addr, key, deadline, timeout)?);
        }
        let mut waiting: Vec<usize> = needed.iter().copied().filter(|&p| p > me).collect();
        listener.set_nonblocking(true)?;
        while !waiting.is_empty() {
            match listener.accept() {
                Ok((stream, from)) => match Self::admit(stream, me, key, &waiting, timeout) {
                    Ok(link) => {
                        waiting.retain(|&p| p != link.peer_rank);
                        links.insert(link.peer_rank, link);
                    }
                    Err(e) => {
                        tracing::warn!(peer = %from, "refused a data-plane connection: {e:#}")
                    }
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!(
                            "rank(s) {waiting:?} did not connect to this rank's data plane within {timeout:?}"
                        );
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).context("accepting data-plane connections"),
            }
        }
        listener.set_nonblocking(false)?;
        Ok(links)
    }

    fn dial(
        me: usize,
        peer: usize,
        addr: &str,
        key: MeshKey,
        deadline: Instant,
        timeout: Duration,
    ) -> anyhow::Result<TcpLink> {
        let sock: SocketAddr = addr
            .parse()
            .with_context(|| format!("rank {peer}'s data-plane address `{addr}`"))?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(&sock, left.max(Duration::from_millis(10))) {
                Ok(stream) => {
                    let link = TcpLink::new(stream, peer, timeout)?;
                    let mut s = &link.stream;
                    // Both ends prove they hold the job's secret; neither sends it.
                    let h = hello(key, me, peer);
                    let mine = nonce()?;
                    s.write_all(&h)
                        .and_then(|_| s.write_all(&mine))
                        .map_err(|e| link.err(e))?;
                    let mut theirs = [0u8; NONCE + 32];
                    s.read_exact(&mut theirs).map_err(|e| {
                        anyhow::anyhow!(
                            "rank {peer} ({addr}) refused this rank's data-plane connection ({e}): another job, generation or token?"
                        )
                    })?;
                    if !same(&key.mac(b"admit", &h, &mine), &theirs[NONCE..]) {
                        bail!(
                            "the process at {addr} (said to be rank {peer}) does not hold this job's token: not connecting to it"
                        );
                    }
                    s.write_all(&key.mac(b"dial", &h, &theirs[..NONCE]))
                        .map_err(|e| link.err(e))?;
                    let mut reply = [0u8; 4];
                    s.read_exact(&mut reply).map_err(|e| link.err(e))?;
                    if &reply != ACCEPTED {
                        bail!("rank {peer} ({addr}) refused this rank's data-plane connection");
                    }
                    return Ok(link);
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("connecting to rank {peer} at {addr}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "rank {peer}'s data plane at {addr} did not answer within {timeout:?}"
                        )
                    })
                }
            }
        }
    }

    fn admit(
        stream: TcpStream,
        me: usize,
        key: MeshKey,
        waiting: &[usize],
        timeout: Duration,
    ) -> anyhow::Result<TcpLink> {
        stream.set_nonblocking(false)?;
        // A stranger gets a short wait, not the whole peer timeout.
        stream.set_read_timeout(Some(timeout.min(Duration::from_secs(5))))?;
        let mut first = [0u8; HELLO_LEN + NONCE];
        (&stream)
            .read_exact(&mut first)
            .context("no complete handshake")?;
        let (h, their_nonce) = first.split_at(HELLO_LEN);
        let from = parse_hello(h, &key, me, waiting)?;
        let mine = nonce()?;
        let mut reply = [0u8; NONCE + 32];
        reply[..NONCE].copy_from_slice(&mine);
        reply[NONCE..].copy_from_slice(&key.mac(b"admit", h, their_nonce));
        (&stream).write_all(&reply)?;
        let mut proof = [0u8; 32];
        (&stream)
            .read_exact(&mut proof)
            .context("no answer to the handshake's challenge")?;
        if !same(&key.mac(b"dial", h, &mine), &proof) {
            bail!("rank {from}'s handshake does not prove this job's token");
        }
        (&stream).write_all(ACCEPTED)?;
        TcpLink::new(stream, from, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_of_another_version_is_refused_by_name() {
        let key = MeshKey::new(7, 2, "t");
        let mut h = hello(key, 1, 0);
        assert_eq!(parse_hello(&h, &key, 0, &[1]).unwrap(), 1);
        h[32..48].copy_from_slice(b"0.0.1-other\0\0\0\0\0");
        let err = parse_hello(&h, &key, 0, &[1]).unwrap_err().to_string();
        assert!(
            err.contains("rank 1 runs alexnet 0.0.1-other") && err.contains(crate::proto::VERSION),
            "{err}"
        );
        let mut g = hello(key, 1, 0);
        g[16..24].copy_from_slice(&3u64.to_le_bytes());
        assert!(parse_hello(&g, &key, 0, &[1])
            .unwrap_err()
            .to_string()
            .contains("generation 3"));
    }
}
