//! The codec's contract: what is encoded decodes to the same thing, a
//! prefix of a frame asks for more bytes and never errs or panics, and bad
//! input is refused with a reason, oversized lengths before any allocation.
use std::net::SocketAddr;

use proptest::prelude::*;
use tpbpf_proto::*;

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
    ]
}

fn dst() -> impl Strategy<Value = Destination> {
    prop_oneof![
        addr().prop_map(Destination::Addr),
        ("[a-z0-9.-]{0,60}", any::<u16>())
            .prop_map(|(host, port)| Destination::Name { host, port }),
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..2048)
}

fn reason() -> impl Strategy<Value = ResetReason> {
    prop_oneof![
        Just(ResetReason::Refused),
        Just(ResetReason::Unreachable),
        Just(ResetReason::Aborted),
        Just(ResetReason::ProtocolError),
        Just(ResetReason::ResumeExpired),
        Just(ResetReason::Other),
    ]
}

fn mode() -> impl Strategy<Value = InterceptMode> {
    prop_oneof![
        Just(InterceptMode::Steal),
        Just(InterceptMode::Mirror),
        (".{0,20}", ".{0,20}").prop_map(|(name, value)| InterceptMode::Header { name, value }),
        ".{0,40}".prop_map(InterceptMode::PathPrefix),
    ]
}

fn credential() -> impl Strategy<Value = Credential> {
    prop_oneof![
        ".{0,200}".prop_map(Credential::Token),
        (
            prop::collection::vec(bytes(), 1..=MAX_PROOF_CHAIN),
            any::<u16>(),
            bytes()
        )
            .prop_map(|(chain, scheme, signature)| Credential::Certificate {
                chain,
                scheme,
                signature
            }),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u32>(),
            "[a-z0-9-]{1,63}",
            "[a-z0-9.-]{1,253}",
            credential()
        )
            .prop_map(
                |(intercept, namespace, pod, credential)| Frame::InterceptProof {
                    intercept,
                    proof: IdentityProof {
                        namespace,
                        pod,
                        credential,
                    },
                }
            ),
        (any::<u32>(), addr(), mode()).prop_map(|(intercept, target, mode)| {
            Frame::InterceptStart {
                intercept,
                target,
                mode,
            }
        }),
        (any::<u32>(), any::<bool>(), ".{0,40}").prop_map(|(intercept, ok, message)| {
            Frame::InterceptStatus {
                intercept,
                ok,
                message,
            }
        }),
        any::<u32>().prop_map(|intercept| Frame::InterceptStop { intercept }),
        (any::<u32>(), any::<u16>(), any::<[u8; 16]>()).prop_map(|(intercept, port, nonce)| {
            Frame::InterceptChallenge {
                intercept,
                port,
                nonce,
            }
        }),
        (any::<u32>(), dst(), bytes()).prop_map(|(stream, dst, data)| Frame::Open {
            stream,
            dst,
            data
        }),
        (any::<u32>(), bytes()).prop_map(|(stream, data)| Frame::Data { stream, data }),
        (any::<u32>(), any::<u32>()).prop_map(|(stream, bytes)| Frame::Credit { stream, bytes }),
        any::<u32>().prop_map(|stream| Frame::HalfClose { stream }),
        (any::<u32>(), reason(), ".{0,80}").prop_map(|(stream, reason, message)| Frame::Reset {
            stream,
            reason,
            message
        }),
        (any::<u32>(), dst(), bytes()).prop_map(|(flow, dst, data)| Frame::Datagram {
            flow,
            dst,
            data
        }),
        (any::<u32>(), bytes()).prop_map(|(id, query)| Frame::DnsQuery { id, query }),
        (any::<u32>(), bytes()).prop_map(|(id, answer)| Frame::DnsAnswer { id, answer }),
        (any::<u32>(), any::<u32>(), addr(), addr()).prop_map(|(intercept, stream, src, dst)| {
            Frame::InterceptIncoming {
                intercept,
                stream,
                src,
                dst,
            }
        }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        ".{0,80}".prop_map(|message| Frame::GoAway { message }),
        any::<u64>().prop_map(|received| Frame::Ack { received }),
    ]
}

proptest! {
    #[test]
    fn every_frame_round_trips(f in frame()) {
        let mut buf = Vec::new();
        encode(&f, &mut buf).unwrap();
        let (back, used) = decode(&buf).unwrap().unwrap();
        prop_assert_eq!(back, f);
        prop_assert_eq!(used, buf.len());
    }

    #[test]
    fn frames_back_to_back_decode_in_order(fs in prop::collection::vec(frame(), 1..8)) {
        let mut buf = Vec::new();
        for f in &fs {
            encode(f, &mut buf).unwrap();
        }
        let mut at = 0;
        for f in &fs {
            let (back, used) = decode(&buf[at..]).unwrap().unwrap();
            prop_assert_eq!(&back, f);
            at += used;
        }
        prop_assert_eq!(at, buf.len());
    }

    #[test]
    fn every_prefix_asks_for_more(f in frame()) {
        let mut buf = Vec::new();
        encode(&f, &mut buf).unwrap();
        for n in 0..buf.len() {
            prop_assert_eq!(decode(&buf[..n]), Ok(None), "prefix of {} bytes", n);
        }
    }

    #[test]
    fn garbage_never_panics(buf in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&buf);
        let _ = decode_hello(&buf);
        let _ = decode_welcome(&buf);
        let _ = data_frame(&buf);
    }

    #[test]
    fn the_data_fast_path_agrees_with_the_codec(stream in any::<u32>(), data in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut fast = Vec::new();
        encode_data(stream, &data, &mut fast);
        let mut slow = Vec::new();
        encode(&Frame::Data { stream, data: data.clone() }, &mut slow).unwrap();
        prop_assert_eq!(&fast, &slow);
        prop_assert_eq!(data_frame(&fast), Some((stream, fast.len())));
        prop_assert_eq!(data_frame(&fast[..fast.len() - 1]), None);
    }

    #[test]
    fn welcome_round_trips(version in any::<u16>(), status in 0u8..5, received in any::<u64>(), message in ".{0,64}") {
        let status = [WelcomeStatus::Accepted, WelcomeStatus::Resumed, WelcomeStatus::Unauthorized, WelcomeStatus::UnknownSession, WelcomeStatus::Version][usize::from(status)];
        let w = Welcome { version, status, received, message };
        let mut buf = Vec::new();
        encode_welcome(&w, &mut buf);
        for n in 0..buf.len() {
            prop_assert_eq!(decode_welcome(&buf[..n]), Ok(None));
        }
        prop_assert_eq!(decode_welcome(&buf), Ok(Some((w, buf.len()))));
    }

    #[test]
    fn hello_round_trips(version in any::<u16>(), session in any::<[u8; 16]>(), resume in any::<bool>(), received in any::<u64>(), token in prop::collection::vec(any::<u8>(), 0..512)) {
        let h = Hello { version, session, resume, received, token };
        let mut buf = Vec::new();
        encode_hello(&h, &mut buf).unwrap();
        for n in 0..buf.len() {
            prop_assert_eq!(decode_hello(&buf[..n]), Ok(None));
        }
        prop_assert_eq!(decode_hello(&buf), Ok(Some((h, buf.len()))));
    }
}

#[test]
fn an_oversized_length_is_refused_from_the_first_four_bytes() {
    let len = (MAX_BODY + 1).to_be_bytes();
    assert_eq!(decode(&len), Err(DecodeError::TooLarge(MAX_BODY + 1)));
    assert_eq!(
        decode(&[0xff, 0xff, 0xff, 0xff]),
        Err(DecodeError::TooLarge(u32::MAX))
    );
}

#[test]
fn encoding_refuses_a_body_over_the_maximum_and_writes_nothing() {
    let mut buf = vec![7u8];
    let big = Frame::Data {
        stream: 1,
        data: vec![0; MAX_BODY as usize + 1],
    };
    assert!(matches!(
        encode(&big, &mut buf),
        Err(DecodeError::TooLarge(_))
    ));
    assert_eq!(buf, vec![7u8]);
    let max = Frame::Data {
        stream: 1,
        data: vec![0; MAX_BODY as usize],
    };
    encode(&max, &mut buf).unwrap();
}

#[test]
fn unknown_types_flags_and_malformed_bodies_are_refused() {
    let mut buf = Vec::new();
    encode(&Frame::Ping { nonce: 1 }, &mut buf).unwrap();
    let mut unknown = buf.clone();
    unknown[4] = 200;
    assert_eq!(decode(&unknown), Err(DecodeError::UnknownType(200)));
    let mut flagged = buf.clone();
    flagged[5] = 1;
    assert!(matches!(decode(&flagged), Err(DecodeError::Flags { .. })));
    // A ping with a stream id.
    let mut with_id = buf.clone();
    with_id[9] = 1;
    assert!(matches!(
        decode(&with_id),
        Err(DecodeError::Malformed { .. })
    ));
    // A ping with a 4-byte body instead of 8.
    let short = [0, 0, 0, 4, 10, 0, 0, 0, 0, 0, 1, 2, 3, 4];
    assert!(matches!(decode(&short), Err(DecodeError::Malformed { .. })));
    // A credit with trailing bytes.
    let long = [0, 0, 0, 5, 3, 0, 0, 0, 0, 1, 0, 0, 0, 9, 9];
    assert!(matches!(decode(&long), Err(DecodeError::Malformed { .. })));
    // An open with an unknown address family.
    let bad_dst = [0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 9];
    assert!(matches!(
        decode(&bad_dst),
        Err(DecodeError::Malformed { .. })
    ));
}

#[test]
fn garbage_instead_of_a_hello_is_refused_at_the_first_byte() {
    assert_eq!(decode_hello(b"G"), Err(DecodeError::BadMagic));
    assert_eq!(
        decode_hello(b"GET / HTTP/1.1\r\n"),
        Err(DecodeError::BadMagic)
    );
    assert_eq!(decode_hello(b"TP"), Ok(None));
    let mut huge_token = MAGIC.to_vec();
    huge_token.extend_from_slice(&[0; 2 + 16 + 1 + 8]);
    huge_token.extend_from_slice(&u16::MAX.to_be_bytes());
    assert!(matches!(
        decode_hello(&huge_token),
        Err(DecodeError::TokenTooLarge(_))
    ));
}

#[test]
fn each_refusal_says_what_was_wrong_in_words() {
    let cases = [
        (
            DecodeError::TooLarge(MAX_BODY + 1),
            format!(
                "frame body of {} bytes is larger than the maximum {MAX_BODY}",
                MAX_BODY + 1
            ),
        ),
        (
            DecodeError::UnknownType(200),
            "unknown frame type 200 (a newer peer? the versions should have been negotiated)"
                .to_string(),
        ),
        (
            DecodeError::Flags { kind: 3, flags: 1 },
            "frame type 3 has undefined flags 0x01".to_string(),
        ),
        (
            DecodeError::Malformed { what: "address" },
            "malformed address".to_string(),
        ),
        (
            DecodeError::BadMagic,
            "not a tpbpf tunnel: the peer did not start with a tpbpf hello".to_string(),
        ),
        (
            DecodeError::TokenTooLarge(5000),
            "hello token of 5000 bytes is larger than the maximum 4096".to_string(),
        ),
    ];
    for (err, text) in cases {
        assert_eq!(err.to_string(), text);
        // An error a caller can box or put behind `anyhow`.
        let _: &dyn std::error::Error = &err;
    }
}

/// The open of an intercepted connection is the layout version 1 defined
/// (only its meaning changed in version 2): the intercept in the header's
/// id, then the stream, the source and the destination.
#[test]
fn an_intercepted_connection_s_open_keeps_its_layout() {
    let frame = Frame::InterceptIncoming {
        intercept: 3,
        stream: 8,
        src: "10.0.9.1:5000".parse().unwrap(),
        dst: "10.0.0.7:8080".parse().unwrap(),
    };
    let mut buf = Vec::new();
    encode(&frame, &mut buf).unwrap();
    #[rustfmt::skip]
    let expected = [
        0, 0, 0, 18, 9, 0, 0, 0, 0, 3,
        0, 0, 0, 8,
        4, 10, 0, 9, 1, 0x13, 0x88,
        4, 10, 0, 0, 7, 0x1f, 0x90,
    ];
    assert_eq!(buf, expected);
    assert_eq!(decode(&buf), Ok(Some((frame, buf.len()))));
    // Cut short: refused, not guessed.
    let mut short = buf[..buf.len() - 1].to_vec();
    short[3] -= 1;
    assert!(matches!(decode(&short), Err(DecodeError::Malformed { .. })));
}

#[test]
fn a_proof_with_too_many_certificates_or_no_pod_is_refused() {
    let proof = |chain: usize, pod: &str| Frame::InterceptProof {
        intercept: 1,
        proof: IdentityProof {
            namespace: "default".into(),
            pod: pod.into(),
            credential: Credential::Certificate {
                chain: vec![vec![0u8; 8]; chain],
                scheme: 0x0403,
                signature: vec![1; 64],
            },
        },
    };
    let mut buf = Vec::new();
    encode(&proof(MAX_PROOF_CHAIN + 1, "web"), &mut buf).unwrap();
    assert!(matches!(decode(&buf), Err(DecodeError::Malformed { .. })));
    buf.clear();
    encode(&proof(1, ""), &mut buf).unwrap();
    assert!(matches!(decode(&buf), Err(DecodeError::Malformed { .. })));
    buf.clear();
    encode(&proof(1, "web"), &mut buf).unwrap();
    assert!(decode(&buf).unwrap().is_some());
}
