//! Frames round-trip through an encoder and a decoder; header blocks name
//! the SPDY/3 dictionary; unknown control frames are skipped, other
//! versions refused.
use super::*;

#[test]
fn dictionary_is_spdy3s() {
    // SPDY/3 section 2.6.10.1: 1423 bytes; zlib names it by its Adler-32.
    assert_eq!(dictionary().len(), 1423);
    assert_eq!(adler32(dictionary()), 0xe3c6_a7c2);
    assert_eq!(&dictionary()[..11], b"\0\0\0\x07options");
    assert!(dictionary().ends_with(b"utf-,*,enq=0."));
}

#[test]
fn frames_round_trip_with_a_shared_compression_stream() {
    let mut enc = Encoder::new();
    let mut dec = Decoder::new();
    let frames = vec![
        Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: Headers::default()
                .with("streamtype", "error")
                .with("port", "80")
                .with("requestid", "0"),
        },
        Frame::SynReply {
            stream_id: 1,
            flags: 0,
            headers: Headers::default(),
        },
        Frame::SynStream {
            stream_id: 3,
            associated_to: 0,
            priority: 2,
            flags: FLAG_FIN,
            headers: Headers(vec![("a".into(), vec!["x".into(), "y".into()])]),
        },
        Frame::Data {
            stream_id: 3,
            flags: FLAG_FIN,
            data: b"hello".to_vec(),
        },
        Frame::RstStream {
            stream_id: 3,
            status: RST_CANCEL,
        },
        Frame::Settings {
            flags: 0,
            entries: vec![Setting {
                flags: 1,
                id: 7,
                value: 65536,
            }],
        },
        Frame::Ping { id: 1 },
        Frame::WindowUpdate {
            stream_id: 1,
            delta: 4096,
        },
        Frame::Headers {
            stream_id: 1,
            flags: 0,
            headers: Headers::default().with("x", "y"),
        },
        Frame::GoAway {
            last_good_stream_id: 3,
            status: GOAWAY_OK,
        },
    ];
    let mut wire = Vec::new();
    for f in &frames {
        wire.extend(enc.encode(f));
    }
    // Fed in small pieces, as a socket or WebSocket messages deliver it.
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for piece in wire.chunks(7) {
        buf.extend_from_slice(piece);
        while let Some(f) = dec.next_frame(&mut buf).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, frames);
    assert!(buf.is_empty());
}

#[test]
fn header_blocks_name_the_spdy3_dictionary() {
    let mut enc = Encoder::new();
    let f = enc.encode(&Frame::SynReply {
        stream_id: 1,
        flags: 0,
        headers: Headers::default(),
    });
    let z = &f[12..];
    // zlib header: deflate, FDICT set, then the dictionary's Adler-32.
    assert_eq!(z[0] & 0x0f, 8);
    assert_ne!(z[1] & 0x20, 0);
    assert_eq!(be32(&z[2..]), adler32(dictionary()));
}

#[test]
fn unknown_control_frames_are_skipped_and_bad_versions_refused() {
    let mut dec = Decoder::new();
    let mut buf = vec![0x80, 3, 0, 10, 0, 0, 0, 2, 0xaa, 0xbb];
    buf.extend(Encoder::new().encode(&Frame::Ping { id: 5 }));
    assert_eq!(
        dec.next_frame(&mut buf).unwrap(),
        Some(Frame::Ping { id: 5 })
    );
    let mut buf = vec![0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1];
    assert!(matches!(dec.next_frame(&mut buf), Err(Error::Version(2))));
}
