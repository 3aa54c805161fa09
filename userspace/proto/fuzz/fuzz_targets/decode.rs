//! The decoders must never panic, and whatever they accept must encode back
//! to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some((frame, used))) = tpbpf_proto::decode(&data[at..]) {
        let mut again = Vec::new();
        tpbpf_proto::encode(&frame, &mut again).expect("a decoded frame encodes");
        assert_eq!(again, data[at..at + used], "re-encoding differs");
        at += used;
    }
    let _ = tpbpf_proto::decode_hello(data);
    let _ = tpbpf_proto::decode_welcome(data);
    if let Some((_, total)) = tpbpf_proto::data_frame(data) {
        assert!(matches!(tpbpf_proto::decode(data), Ok(Some((tpbpf_proto::Frame::Data { .. }, n))) if n == total));
    }
});
