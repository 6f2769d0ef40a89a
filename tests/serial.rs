//! Serial ports against real pseudo-terminals (socat): CSV lines arrive as readings
//! with numbers, a noisy or over-long line is counted and skipped, an unplugged port
//! (the pty pair destroyed and recreated) is reopened and readings continue, and a
//! second port keeps flowing while the first is gone.

mod support;

use std::path::Path;

use support::*;

fn config(receiver: &Receiver, admin: u16, ports: &[(&str, &Path)]) -> String {
    let mut s = format!(
        "[agent]\nid = \"gw-serial\"\ndata_dir = \"data\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"
    );
    for (name, path) in ports {
        s.push_str(&format!(
            "\n[[source.serial]]\nname = \"{name}\"\npath = {:?}\nformat = \"csv\"\nfields = [\"temperature\", \"door\"]\nmax_frame = \"64B\"\nreopen = {{ min = \"100ms\", max = \"500ms\" }}\n",
            path.display().to_string()
        ));
    }
    s.push_str(&format!(
        "\n[[sink.http]]\nname = \"cloud\"\nurl = \"{}\"\nmode = \"batch\"\nretry = {{ min = \"100ms\", max = \"1s\" }}\n",
        receiver.url()
    ));
    s
}

fn readings_from(receiver: &Receiver, device: &str) -> Vec<Event> {
    receiver
        .readings()
        .into_iter()
        .filter(|e| e.subject.as_deref() == Some(device))
        .collect()
}

fn wait_for(agent: &mut Agent, receiver: &Receiver, device: &str, n: usize) -> Vec<Event> {
    agent.eventually(&format!("{n} readings from {device}"), |_| {
        let r = readings_from(receiver, device);
        if r.len() >= n {
            Ok(r)
        } else {
            Err(format!("{} so far", r.len()))
        }
    })
}

#[test]
fn csv_lines_from_a_serial_port_arrive_as_readings_and_noise_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cable = Cable::plug(dir.path(), "freezer");
    let receiver = Receiver::start();
    let mut agent = Agent::start(
        &config(&receiver, free_port(), &[("freezer", &cable.port())]),
        &[],
    );
    agent.eventually("the port to be opened", |a| {
        if a.stderr_contains("serial port open") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });

    // A frame split across writes, invalid UTF-8, an over-long line, CRLF.
    cable.send(b"-18.5,cl");
    cable.send(b"osed\n\xff\xfe\n");
    cable.send(&[b'9'; 200]);
    cable.send(b"\n-17.0,open\r\n");
    let readings = wait_for(&mut agent, &receiver, "freezer", 2);
    assert_eq!(
        readings[0].data,
        serde_json::json!({"temperature": -18.5, "door": "closed"})
    );
    assert_eq!(
        readings[1].data,
        serde_json::json!({"temperature": -17.0, "door": "open"})
    );
    assert_eq!(readings[0].source, "/ferry/gw-serial/serial/freezer");
    let m = agent.wait_for_metric(
        "ferry_input_rejected_total",
        &[("source", "freezer"), ("reason", "too_long")],
        1.0,
    );
    assert_eq!(
        m.value(
            "ferry_input_rejected_total",
            &[("source", "freezer"), ("reason", "invalid_utf8")]
        ),
        1.0,
        "{}",
        m.ferry_lines()
    );
    assert!(agent.stop().success());
}

#[test]
fn an_unplugged_port_is_reopened_and_another_port_keeps_flowing_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Cable::plug(dir.path(), "first");
    let second = Cable::plug(dir.path(), "second");
    let receiver = Receiver::start();
    let config = config(
        &receiver,
        free_port(),
        &[("first", &first.port()), ("second", &second.port())],
    );
    let mut agent = Agent::start(&config, &[]);
    agent.eventually("both ports to be opened", |a| {
        let n = a.stderr().matches("serial port open").count();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} open"))
        }
    });
    first.send(b"1,a\n");
    second.send(b"2,b\n");
    wait_for(&mut agent, &receiver, "first", 1);
    wait_for(&mut agent, &receiver, "second", 1);

    first.unplug();
    agent.eventually("the agent to notice the unplug", |a| {
        if a.stderr_contains("serial port lost") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });
    second.send(b"3,c\n");
    wait_for(&mut agent, &receiver, "second", 2);

    first.replug();
    agent.eventually("the first port to be reopened", |a| {
        let n = a.stderr().matches("serial port open").count();
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} opens"))
        }
    });
    first.send(b"4,d\n");
    let r = wait_for(&mut agent, &receiver, "first", 2);
    assert_eq!(
        r[1].data,
        serde_json::json!({"temperature": 4, "door": "d"})
    );
    assert!(agent.stop().success());
}
