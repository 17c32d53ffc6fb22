//! A `.kiln` artifact from arbitrary bytes, through both readers: the slice parser the mmap
//! path uses and the `embedded_io` reader firmware uses. Either may refuse; neither may panic,
//! and they must agree on what they accept.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let parsed = kiln_runtime::artifact::parse(bytes);
    let mut buf = vec![0u64; bytes.len() / 8 + 16];
    let mut reader = bytes;
    let read = kiln_runtime::artifact::read_into(&mut reader, &mut buf);
    assert_eq!(parsed.is_ok(), read.is_ok(), "the readers disagree");
});
