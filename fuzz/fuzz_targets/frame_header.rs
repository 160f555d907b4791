//! `check_frame_header` on arbitrary bytes: never panics, accepts only the header it should.
//!
//! Input: seq (u64 LE, 8 bytes) | expect (u32 LE, 4 bytes) | header (the rest, any length).
#![no_main]

use alexnet::comm::tcp::check_frame_header;
use libfuzzer_sys::fuzz_target;

fn well_formed(seq: u64, expect: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(b"AXF1");
    h[4..12].copy_from_slice(&seq.to_le_bytes());
    h[12..].copy_from_slice(&expect.to_le_bytes());
    h
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        // Short inputs: still a header, with the due block taken as 0 of 0 values.
        let _ = check_frame_header(data, 0, 0);
        return;
    }
    let seq = u64::from_le_bytes(data[..8].try_into().unwrap());
    let expect = u32::from_le_bytes(data[8..12].try_into().unwrap());
    let header = &data[12..];

    let got = check_frame_header(header, seq, expect as usize);
    // Accepted exactly when the header is the one this block calls for.
    assert_eq!(
        got.is_ok(),
        header == well_formed(seq, expect),
        "{header:?} seq {seq} expect {expect}: {got:?}"
    );
    // The header that is due is accepted; a count beyond u32 never is.
    assert!(check_frame_header(&well_formed(seq, expect), seq, expect as usize).is_ok());
    assert!(check_frame_header(header, seq, expect as usize + (1usize << 32)).is_err());
});
