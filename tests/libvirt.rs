//! libvirt: every failover and test failover writes a `domain.xml` that
//! `virt-xml-validate` accepts, naming the materialized disks (absolute paths) and the
//! target network (the isolated one for a test); `protect --libvirt-domain` takes a VM's
//! disks from `virsh dumpxml` output and prints `<disk>` elements that, put in place of the
//! originals, still make a valid domain; what it cannot protect is one line naming the file.

mod common;

use common::{sha, Env};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `virt-xml-validate FILE domain` must accept the file.
pub fn validate(path: &Path) {
    let out = Command::new("virt-xml-validate")
        .arg(path)
        .arg("domain")
        .output()
        .expect("virt-xml-validate (Debian: libvirt-clients, libxml2-utils) must be installed");
    assert!(
        out.status.success(),
        "virt-xml-validate {}: {}{}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

fn disk(root: &Path, name: &str, fill: u8) -> PathBuf {
    let p = root.join(format!("{name}.raw"));
    let mut data = vec![0u8; 2 << 20];
    data[..4096].fill(fill);
    std::fs::write(&p, &data).unwrap();
    p
}

/// A `virsh dumpxml` of a running domain: two raw file disks, a cdrom, a network.
fn dumpxml(os: &Path, data: &Path) -> String {
    format!(
        r#"<domain type='kvm' id='7'>
  <name>web01</name>
  <uuid>6f0e8f2e-1d4b-4c1a-9d55-1c8e3c1f2a10</uuid>
  <memory unit='KiB'>2097152</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
"#,
        os.display(),
        data.display()
    )
}

/// What a failover's `domain.xml` must say: valid, each disk of the report at its absolute
/// path as a raw file, and one interface on `network`.
fn check_domain(report: &Value, network: &str) {
    let dir = PathBuf::from(report["dir"].as_str().unwrap());
    let path = dir.join("domain.xml");
    assert_eq!(report["domain_xml"].as_str(), path.to_str());
    validate(&path);
    let xml = std::fs::read_to_string(&path).unwrap();
    for d in report["disks"].as_array().unwrap() {
        let p = d["path"].as_str().unwrap();
        assert!(Path::new(p).is_absolute());
        assert!(xml.contains(&format!("<source file='{p}'/>")), "{xml}");
        let bytes = std::fs::read(p).unwrap();
        assert_eq!(sha(&bytes), d["sha256"].as_str().unwrap());
    }
    assert_eq!(
        xml.matches("<disk ").count(),
        report["disks"].as_array().unwrap().len()
    );
    assert!(xml.contains("<driver name='qemu' type='raw'/>"));
    assert!(
        xml.contains(&format!("<source network='{network}'/>")),
        "{xml}"
    );
}

#[test]
fn failovers_write_a_valid_libvirt_domain() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let os = disk(&env.root, "os", 7);
    let data = disk(&env.root, "data", 9);
    env.ok(&[
        "protect",
        "vm",
        "--disk",
        &format!("os={}", os.display()),
        "--disk",
        &format!("data={}", data.display()),
        "--network",
        "prod",
    ]);
    let t = env.json(&[
        "test-failover",
        "vm",
        "--point",
        "latest-processed",
        "--json",
    ]);
    check_domain(&t, "prod-asr-test");
    let xml =
        std::fs::read_to_string(Path::new(t["dir"].as_str().unwrap()).join("domain.xml")).unwrap();
    assert!(xml.contains("<name>vm-test</name>"));
    // Disks named os and data are the guest's vda and vdb, in the VM's order.
    assert!(xml.contains("os.raw'/>\n      <target dev='vda'"), "{xml}");
    assert!(
        xml.contains("data.raw'/>\n      <target dev='vdb'"),
        "{xml}"
    );
    // The text report names it too.
    env.ok(&["test-failover-cleanup", "vm"]);
    let text = env.ok(&[
        "test-failover",
        "vm",
        "--point",
        "latest-processed",
        "--network",
        "lab",
    ]);
    assert!(text.contains("libvirt domain "), "{text}");
    let st = env.json(&["status", "vm", "--json"]);
    let dir = PathBuf::from(st["vms"][0]["test_failover"]["dir"].as_str().unwrap());
    validate(&dir.join("domain.xml"));
    assert!(std::fs::read_to_string(dir.join("domain.xml"))
        .unwrap()
        .contains("<source network='lab'/>"));
    env.ok(&["test-failover-cleanup", "vm"]);
    assert!(!dir.exists());

    let out = env.root.join("recovered");
    let f = env.json(&[
        "failover",
        "vm",
        "--point",
        "latest",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    check_domain(&f, "prod-asr");
    assert!(std::fs::read_to_string(out.join("domain.xml"))
        .unwrap()
        .contains("<name>vm</name>"));
}

#[test]
fn protect_from_a_libvirt_domain() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let os = disk(&env.root, "web-os", 3);
    let data = disk(&env.root, "web-data", 4);
    let xml_path = env.root.join("web01.xml");
    let original = dumpxml(&os, &data);
    std::fs::write(&xml_path, &original).unwrap();
    let out = env.ok(&[
        "protect",
        "web01",
        "--libvirt-domain",
        xml_path.to_str().unwrap(),
        "--agent-listen",
        "127.0.0.1:10901",
    ]);
    let st = env.json(&["status", "web01", "--json"]);
    let disks: Vec<(String, String)> = st["vms"][0]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["source"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        disks,
        vec![
            ("vda".to_string(), os.display().to_string()),
            ("vdb".to_string(), data.display().to_string())
        ]
    );
    // The printed elements, put in place of the two file disks, make a valid domain.
    let start = out.find("<disk type='network'").expect(&out);
    let printed = &out[start..];
    assert_eq!(printed.matches("<disk ").count(), 2, "{out}");
    assert!(printed.contains("<source protocol='nbd' name='vda'>"));
    assert!(printed.contains("<source protocol='nbd' name='vdb'>"));
    assert_eq!(
        printed
            .matches("<host name='127.0.0.1' port='10901'/>")
            .count(),
        2
    );
    let cut = |s: &str, from: &str| {
        let i = s.find(from).unwrap();
        let j = i + s[i..].find("</disk>").unwrap() + "</disk>".len();
        (i, j)
    };
    let (i, j) = cut(&original, "<disk type='file' device='disk'>");
    let mut edited = format!("{}{}{}", &original[..i], printed.trim_end(), &original[j..]);
    let (i, j) = cut(&edited, "<disk type='file' device='disk'>");
    edited = format!("{}{}", &edited[..i], &edited[j..]);
    let edited_path = env.root.join("web01-nbd.xml");
    std::fs::write(&edited_path, &edited).unwrap();
    validate(&edited_path);
    validate(&xml_path);
    // The names are what the agent serves: its exports are the disks' names.
    let points = env.json(&["points", "web01", "--json"]);
    assert_eq!(points["points"].as_array().unwrap().len(), 1);
}

#[test]
fn what_cannot_be_protected_from_a_domain_is_one_line() {
    let env = Env::empty();
    env.ok(&["init", env.vault.to_str().unwrap()]);
    let os = disk(&env.root, "os", 1);
    let data = disk(&env.root, "data", 2);
    let good = dumpxml(&os, &data);
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed", good.replace("</devices>", ""), "not well-formed"),
        (
            "nodisks",
            "<domain type='kvm'><name>x</name><devices><emulator>/usr/bin/qemu</emulator></devices></domain>".into(),
            "no disks",
        ),
        (
            "block",
            good.replace(
                &format!("<disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='{}'/>", data.display()),
                "<disk type='block' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source dev='/dev/sdb'/>",
            ),
            "disk vdb is type='block'",
        ),
        ("qcow2", good.replace("type='raw' cache='none'", "type='qcow2'"), "qcow2"),
        ("notdomain", "<network><name>n</name></network>".into(), "not <domain>"),
    ];
    for (name, text, want) in cases {
        let p = env.root.join(format!("{name}.xml"));
        std::fs::write(&p, text).unwrap();
        let out = env.run(&["protect", "vm", "--libvirt-domain", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.contains(p.to_str().unwrap()), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
    }
    let missing = env.root.join("missing.xml");
    let out = env.run(&[
        "protect",
        "vm",
        "--libvirt-domain",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.xml"));
    // --disk and --libvirt-domain together are a usage error.
    let out = env.run(&[
        "protect",
        "vm",
        "--libvirt-domain",
        missing.to_str().unwrap(),
        "--disk",
        &format!("os={}", os.display()),
    ]);
    assert_eq!(out.status.code(), Some(2));
    // Nothing was protected by any of these.
    let st = env.json(&["status", "--json"]);
    assert_eq!(st["vms"].as_array().unwrap().len(), 0);
}
