//! libvirt both ways: the domain XML a failover writes beside `vm.json` (so the
//! materialized disks boot with `virsh define` + `virsh start`), and reading a running
//! domain's XML (`virsh dumpxml`) to protect its file-backed disks and print the
//! `<disk>` elements that route them through the agent over NBD.
//!
//! Parsing goes through quick-xml; what is written is built here with every value escaped.

use quick_xml::escape::escape;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use standby_engine::vault::FailoverReport;
use standby_engine::Error;
use std::path::{Path, PathBuf};

/// Memory and vCPUs of a failed-over domain: the vault records neither, so a domain gets
/// these unless the operator changes them (`virsh setmaxmem`/`setvcpus`, or edit before
/// `virsh define`).
pub const DEFAULT_MEMORY_MIB: u64 = 1024;
pub const DEFAULT_VCPUS: u32 = 1;

/// The name of the file written beside `vm.json`.
pub const DOMAIN_FILE: &str = "domain.xml";

/// One disk of a domain, as `virsh dumpxml` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// The guest's device name (`vda`): Standby names the disk after it.
    pub dev: String,
    /// The bus (`virtio`, `scsi`, `sata`, …), kept for the NBD element.
    pub bus: Option<String>,
    pub file: PathBuf,
}

/// The libvirt domain of a failover's disks: raw files at their absolute paths, one
/// interface on the target network (the isolated one for a test failover).
pub fn domain_xml(r: &FailoverReport) -> String {
    let name = if r.test {
        format!("{}-test", r.vm)
    } else {
        r.vm.clone()
    };
    let (arch, machine) = match std::env::consts::ARCH {
        "aarch64" => ("aarch64", " machine='virt'"),
        _ => ("x86_64", ""),
    };
    let what = if r.test { "test failover" } else { "failover" };
    let point = match &r.point {
        Some(p) => format!("point {} (seq {})", p.id, p.seq),
        None => format!("seq {}", r.seq),
    };
    let mut x = String::new();
    x.push_str("<domain type='kvm'>\n");
    x.push_str(&format!("  <name>{}</name>\n", escape(name.as_str())));
    x.push_str(&format!(
        "  <description>Standby {what} of {} to {point}; resource group {}, subnet {}</description>\n",
        escape(r.vm.as_str()),
        escape(r.resource_group.as_str()),
        escape(r.subnet.as_str())
    ));
    x.push_str(&format!(
        "  <memory unit='MiB'>{DEFAULT_MEMORY_MIB}</memory>\n"
    ));
    x.push_str(&format!("  <vcpu>{DEFAULT_VCPUS}</vcpu>\n"));
    x.push_str(&format!(
        "  <os>\n    <type arch='{arch}'{machine}>hvm</type>\n    <boot dev='hd'/>\n  </os>\n"
    ));
    x.push_str("  <features>\n    <acpi/>\n  </features>\n");
    x.push_str("  <devices>\n");
    for (i, d) in r.disks.iter().enumerate() {
        let (dev, bus) = target_of(&d.name, i);
        x.push_str("    <disk type='file' device='disk'>\n");
        x.push_str("      <driver name='qemu' type='raw'/>\n");
        x.push_str(&format!(
            "      <source file='{}'/>\n",
            escape(d.path.to_string_lossy())
        ));
        x.push_str(&format!("      <target dev='{dev}' bus='{bus}'/>\n"));
        x.push_str("    </disk>\n");
    }
    x.push_str("    <interface type='network'>\n");
    x.push_str(&format!(
        "      <source network='{}'/>\n",
        escape(r.network.as_str())
    ));
    x.push_str("      <model type='virtio'/>\n");
    x.push_str("    </interface>\n");
    x.push_str("    <console type='pty'/>\n");
    x.push_str("  </devices>\n");
    x.push_str("</domain>\n");
    x
}

/// The guest device of the `i`-th disk: its own name when it is one (a disk protected from
/// a domain is named after its device), else vda, vdb, … in order.
fn target_of(name: &str, i: usize) -> (String, &'static str) {
    let bus = |prefix: &str| match prefix {
        "sd" => "scsi",
        "hd" => "ide",
        _ => "virtio",
    };
    for prefix in ["vd", "sd", "hd"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase()) {
                return (name.to_string(), bus(prefix));
            }
        }
    }
    (format!("vd{}", letters(i)), "virtio")
}

/// 0 → a, 25 → z, 26 → aa (as the kernel names disks).
fn letters(mut i: usize) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// Write `domain.xml` into a failover's directory: a temporary file, synced, renamed.
pub fn write_domain(r: &FailoverReport) -> Result<PathBuf, Error> {
    let path = r.dir.join(DOMAIN_FILE);
    let tmp = r.dir.join(format!(".{DOMAIN_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(domain_xml(r).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&r.dir)?.sync_all()
    };
    write().map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// The disks of a domain XML: every `<disk device='disk'>` (cdroms and floppies are not
/// the VM's data and are skipped). A malformed document, a domain without disks, or a disk
/// that is not a raw file is refused, naming `file`.
pub fn read_domain_disks(file: &Path) -> Result<Vec<DomainDisk>, Error> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    parse_domain_disks(&text).map_err(|what| Error::Invalid(format!("{}: {what}", file.display())))
}

#[derive(Default)]
struct DiskBuilder {
    kind: String,
    device: String,
    driver_type: Option<String>,
    file: Option<String>,
    dev: Option<String>,
    bus: Option<String>,
}

fn attr(e: &BytesStart, name: &str) -> Result<Option<String>, String> {
    for a in e.attributes() {
        let a = a.map_err(|err| format!("not well-formed XML: {err}"))?;
        if a.key.as_ref() == name {
            let v = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| format!("not well-formed XML: {err}"))?;
            return Ok(Some(v.into_owned()));
        }
    }
    Ok(None)
}

fn parse_domain_disks(text: &str) -> Result<Vec<DomainDisk>, String> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<String> = Vec::new();
    let mut disk: Option<DiskBuilder> = None;
    let mut disks = Vec::new();
    let mut saw_domain = false;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| format!("not well-formed XML: {e}"))?;
        let (start, empty) = match &ev {
            Event::Start(e) => (Some(e), false),
            Event::Empty(e) => (Some(e), true),
            Event::End(_) => {
                let name = stack.pop().unwrap_or_default();
                if name == "disk" && stack.len() == 2 {
                    if let Some(d) = disk.take() {
                        if let Some(d) = finish_disk(d)? {
                            disks.push(d);
                        }
                    }
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let Some(e) = start else { continue };
        let name = e.name().as_ref().to_string();
        let path: Vec<&str> = stack.iter().map(String::as_str).collect();
        match (path.as_slice(), name.as_str()) {
            ([], "domain") => saw_domain = true,
            ([], other) => return Err(format!("the root element is <{other}>, not <domain>")),
            (["domain", "devices"], "disk") => {
                let d = DiskBuilder {
                    kind: attr(e, "type")?.unwrap_or_else(|| "file".into()),
                    device: attr(e, "device")?.unwrap_or_else(|| "disk".into()),
                    ..Default::default()
                };
                if empty {
                    if let Some(d) = finish_disk(d)? {
                        disks.push(d);
                    }
                } else {
                    disk = Some(d);
                }
            }
            (["domain", "devices", "disk"], child) => {
                if let Some(d) = disk.as_mut() {
                    match child {
                        "driver" => d.driver_type = attr(e, "type")?,
                        "source" => d.file = attr(e, "file")?,
                        "target" => {
                            d.dev = attr(e, "dev")?;
                            d.bus = attr(e, "bus")?;
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        if !empty {
            stack.push(name);
        }
    }
    if !stack.is_empty() {
        return Err(format!(
            "not well-formed XML: <{}> is never closed",
            stack.last().map(String::as_str).unwrap_or("")
        ));
    }
    if !saw_domain {
        return Err("no <domain> element (expected `virsh dumpxml` output)".into());
    }
    if disks.is_empty() {
        return Err("the domain has no disks (no <disk device='disk'> under <devices>)".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for d in &disks {
        if !seen.insert(d.dev.clone()) {
            return Err(format!("two disks have target dev '{}'", d.dev));
        }
    }
    Ok(disks)
}

/// A finished `<disk>`: `None` for a cdrom or floppy, an error for a disk Standby cannot
/// replicate (not a file, not raw, no source or target).
fn finish_disk(d: DiskBuilder) -> Result<Option<DomainDisk>, String> {
    if d.device != "disk" {
        return Ok(None);
    }
    let dev = d
        .dev
        .ok_or_else(|| "a <disk> has no <target dev=…>".to_string())?;
    if d.kind != "file" {
        return Err(format!(
            "disk {dev} is type='{}'; only file-backed disks (type='file') can be protected",
            d.kind
        ));
    }
    if let Some(t) = d.driver_type.as_deref() {
        if t != "raw" {
            return Err(format!(
                "disk {dev} is a {t} image; Standby replicates raw images (convert it with qemu-img convert -O raw)"
            ));
        }
    }
    let file = d
        .file
        .ok_or_else(|| format!("disk {dev} has no <source file=…>"))?;
    Ok(Some(DomainDisk {
        dev,
        bus: d.bus,
        file: PathBuf::from(file),
    }))
}

/// The `<disk>` elements that serve `disks` through the agent at `host:port` over NBD (the
/// agent's export of each disk is named after it), for `virsh edit`.
pub fn nbd_disks_xml(disks: &[DomainDisk], host: &str, port: u16) -> String {
    let mut x = String::new();
    for d in disks {
        let bus = d
            .bus
            .as_deref()
            .map(|b| format!(" bus='{}'", escape(b)))
            .unwrap_or_default();
        x.push_str("<disk type='network' device='disk'>\n");
        x.push_str("  <driver name='qemu' type='raw' cache='none'/>\n");
        x.push_str(&format!(
            "  <source protocol='nbd' name='{}'>\n",
            escape(d.dev.as_str())
        ));
        x.push_str(&format!(
            "    <host name='{}' port='{port}'/>\n",
            escape(host)
        ));
        x.push_str("  </source>\n");
        x.push_str(&format!(
            "  <target dev='{}'{bus}/>\n",
            escape(d.dev.as_str())
        ));
        x.push_str("</disk>\n");
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = r#"<domain type='kvm' id='3'>
  <name>web01</name>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/images/web01&amp;os.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/images/web01-data.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn reads_file_disks_and_skips_cdroms() {
        let d = parse_domain_disks(DUMP).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].dev, "vda");
        assert_eq!(d[0].file, PathBuf::from("/images/web01&os.raw"));
        assert_eq!(d[1].dev, "vdb");
    }

    #[test]
    fn refuses_what_it_cannot_protect() {
        let block = DUMP.replace(
            "<disk type='file' device='disk'>\n      <source file='/images/web01-data.raw'/>",
            "<disk type='block' device='disk'>\n      <source dev='/dev/sdb'/>",
        );
        assert!(parse_domain_disks(&block)
            .unwrap_err()
            .contains("disk vdb is type='block'"));
        let qcow = DUMP.replace("type='raw'", "type='qcow2'");
        assert!(parse_domain_disks(&qcow).unwrap_err().contains("qcow2"));
        assert!(parse_domain_disks("<domain><devices></devices></domain>")
            .unwrap_err()
            .contains("no disks"));
        assert!(parse_domain_disks("<domain><devices>")
            .unwrap_err()
            .contains("never closed"));
        assert!(parse_domain_disks("<domain></devices></domain>")
            .unwrap_err()
            .contains("not well-formed"));
        assert!(parse_domain_disks("<pool/>")
            .unwrap_err()
            .contains("<pool>"));
    }

    #[test]
    fn device_names() {
        assert_eq!(target_of("vdc", 0), ("vdc".to_string(), "virtio"));
        assert_eq!(target_of("sdb", 0), ("sdb".to_string(), "scsi"));
        assert_eq!(target_of("os", 1), ("vdb".to_string(), "virtio"));
        assert_eq!(letters(25), "z");
        assert_eq!(letters(26), "aa");
        assert_eq!(letters(27), "ab");
    }

    #[test]
    fn nbd_elements_parse_back() {
        let disks = parse_domain_disks(DUMP).unwrap();
        let x = nbd_disks_xml(&disks, "127.0.0.1", 10809);
        let doc = format!("<domain><devices>{x}</devices></domain>");
        // Network disks are refused as protect input, naming the first one.
        assert!(parse_domain_disks(&doc)
            .unwrap_err()
            .contains("disk vda is type='network'"));
        assert!(x.contains("<source protocol='nbd' name='vdb'>"));
        assert!(x.contains("<host name='127.0.0.1' port='10809'/>"));
    }
}
