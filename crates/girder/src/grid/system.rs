//! What a node can tell about the machine it runs on: CPUs, memory, load, host name.

/// A snapshot of the machine.
#[derive(Debug, Clone, Default)]
pub(crate) struct Machine {
    pub(crate) cpus: u32,
    pub(crate) memory_total_bytes: u64,
    pub(crate) memory_free_bytes: u64,
    pub(crate) load_1m: f64,
    pub(crate) host: String,
}

fn meminfo_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// Reads the machine's figures; whatever cannot be read (not Linux) is left at zero.
pub(crate) fn read() -> Machine {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let load_1m = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|l| l.parse().ok()))
        .unwrap_or(0.0);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    Machine {
        cpus,
        memory_total_bytes: meminfo_kib(&meminfo, "MemTotal:").unwrap_or(0) * 1024,
        memory_free_bytes: meminfo_kib(&meminfo, "MemAvailable:").unwrap_or(0) * 1024,
        load_1m,
        host,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_machine() {
        let machine = super::read();
        assert!(machine.cpus >= 1);
        if cfg!(target_os = "linux") {
            assert!(machine.memory_total_bytes > 0 && machine.memory_free_bytes <= machine.memory_total_bytes);
        }
    }
}
