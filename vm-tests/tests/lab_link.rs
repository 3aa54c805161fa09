//! `tpbpf lab up --link DELAY,RATE,LOSS`: the developer machine reaches
//! the cluster over a link with that delay, rate and loss, each way. Only
//! bounds that the link cannot beat are checked (a connect takes at least
//! two delays, a transfer at least its bytes at the rate), and loss within
//! a wide binomial band: the link is slower than asked only by what this
//! machine adds.
use std::{
    io::Write,
    net::{TcpStream, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use tpbpf_vm_tests::*;

const NODE1: &str = "172.31.0.11";

#[test]
fn a_lab_link_delays_limits_and_loses_as_asked() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up_with("lk", &["--link", "20ms,20mbit,10%"]) else {
        return;
    };
    assert_eq!(lab.status["link"], "20ms,20mbit,10%", "{}", lab.status);
    assert_eq!(lab.status["link_running"], true, "{}", lab.status);
    let dev = lab.dev_netns();
    let node = format!("{}-node1", lab.name);
    let mut udp = Command::new(testserver_bin());
    udp.args(["--netns", &node, "udp-echo", &format!("{NODE1}:18600")]);
    let mut udp = Bg::spawn(&mut udp);
    udp.wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
        .expect("udp echo");
    let mut upload = Command::new(testserver_bin());
    upload.args(["--netns", &node, "upload", &format!("{NODE1}:18601")]);
    let mut upload = Bg::spawn(&mut upload);
    upload
        .wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
        .expect("upload server");

    // Delay: a TCP handshake is a round trip, two delays at least.
    let connects: Vec<Duration> = in_netns(&dev, || {
        (0..10)
            .filter_map(|_| {
                let t = Instant::now();
                TcpStream::connect_timeout(
                    &format!("{NODE1}:18601").parse().unwrap(),
                    Duration::from_secs(10),
                )
                .ok()
                .map(|_| t.elapsed())
            })
            .collect()
    });
    println!("connects over the link: {connects:?}");
    assert!(connects.len() >= 8, "{connects:?}");
    assert!(
        connects.iter().all(|c| *c >= Duration::from_millis(40)),
        "a handshake faster than two delays: {connects:?}"
    );

    // Loss: 10% each way, so about 19% of echoes do not come back.
    let (sent, back) = in_netns(&dev, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(format!("{NODE1}:18600")).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let (mut sent, mut back) = (0u32, 0u32);
        let mut buf = [0u8; 64];
        for i in 0..400u32 {
            s.send(format!("probe {i}").as_bytes()).unwrap();
            sent += 1;
            while s.recv(&mut buf).is_ok() {
                back += 1;
            }
        }
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        while s.recv(&mut buf).is_ok() {
            back += 1;
        }
        (sent, back)
    });
    let lost = 1.0 - f64::from(back) / f64::from(sent);
    println!(
        "echoes: {back} of {sent} came back ({:.1}% lost)",
        lost * 100.0
    );
    assert!((0.08..=0.32).contains(&lost), "{lost}");

    // Rate: 1 MiB takes at least its bits at 20 Mbit/s (0.42 s).
    let took = in_netns(&dev, || {
        let body = vec![b'x'; 1 << 20];
        let t = Instant::now();
        let mut c = TcpStream::connect(format!("{NODE1}:18601")).unwrap();
        write!(
            c,
            "PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        c.write_all(&body).unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut c, &mut answer).unwrap();
        assert!(answer.contains("received 1048576"), "{answer}");
        t.elapsed()
    });
    println!("1 MiB over 20 Mbit/s: {took:?}");
    assert!(
        took >= Duration::from_millis(420),
        "faster than the rate: {took:?}"
    );
    assert!(took < Duration::from_secs(60), "{took:?}");
    drop(lab);
}

#[test]
fn a_lab_link_is_refused_when_malformed_and_goes_with_the_lab() {
    if !require_root() {
        return;
    }
    let out = Command::new(tpbpf_bin())
        .args([
            "lab",
            "--name",
            &unique_name("lb"),
            "up",
            "--link",
            "20ms,fast",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("DELAY[,RATE[,LOSS]]"),
        "{err}"
    );
    let Some(lab) = LabGuard::up_with("lb", &["--link", "1ms"]) else {
        return;
    };
    let wan = format!("/run/netns/{}-wan", lab.name);
    assert!(std::path::Path::new(&wan).exists());
    let pid: i32 = std::fs::read_to_string(lab.state_dir().join("link.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Up again with another link: refused, saying how.
    let out = Command::new(tpbpf_bin())
        .args(["lab", "--name", &lab.name, "up", "--link", "5ms"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("lab down"), "{err}");
    let name = lab.name.clone();
    drop(lab);
    assert!(!std::path::Path::new(&wan).exists(), "{name}-wan left");
    assert!(
        wait_for(Duration::from_secs(2), || process_gone(pid)),
        "the link process {pid} outlived its lab"
    );
}
