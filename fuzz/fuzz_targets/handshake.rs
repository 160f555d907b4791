//! `parse_hello` on arbitrary bytes: never panics, accepts only a hello of this mesh.
//!
//! Input: me (u8) | n (u8, n % 8 ranks waited for) | n ranks (u8 each) | job (u64 LE) |
//! generation (u64 LE) | hello (32 bytes, or all that is left when fewer) | token (the rest).
#![no_main]

use alexnet::comm::tcp::parse_hello;
use alexnet::comm::MeshKey;
use libfuzzer_sys::fuzz_target;

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = data.split_at(n.min(data.len()));
    *data = tail;
    head
}

fn u64_of(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(w)
}

fn hello(job: u64, generation: u64, from: u32, to: u32) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..4].copy_from_slice(b"AXH1");
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    h[8..16].copy_from_slice(&job.to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    h[24..28].copy_from_slice(&from.to_le_bytes());
    h[28..32].copy_from_slice(&to.to_le_bytes());
    h
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let me = take(&mut rest, 1).first().copied().unwrap_or(0) as usize;
    let n = take(&mut rest, 1).first().copied().unwrap_or(0) as usize % 8;
    let waiting: Vec<usize> = take(&mut rest, n).iter().map(|&r| r as usize).collect();
    let job = u64_of(take(&mut rest, 8));
    let generation = u64_of(take(&mut rest, 8));
    let h = take(&mut rest, 32);
    let token = String::from_utf8_lossy(rest);
    let key = MeshKey::new(job, generation, &token);

    match parse_hello(h, &key, me, &waiting) {
        Ok(from) => {
            // Only a hello of this job and generation, to this rank, from an awaited rank.
            assert!(
                waiting.contains(&from),
                "accepted rank {from} not in {waiting:?}"
            );
            assert_eq!(h, hello(job, generation, from as u32, me as u32));
        }
        Err(e) => {
            let _ = format!("{e:#}");
        }
    }
    // The hello every awaited rank would send is accepted, whatever the token.
    for &from in &waiting {
        let good = hello(job, generation, from as u32, me as u32);
        assert_eq!(parse_hello(&good, &key, me, &waiting).ok(), Some(from));
    }
});
