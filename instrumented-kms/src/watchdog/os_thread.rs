//! What the kernel says a thread is doing: `/proc/self/task/<tid>/stat` and
//! `wchan`. A worker stuck in a blocking syscall shows `S` or `D` and the
//! kernel function it sleeps in; one spinning on the CPU shows `R`.

/// State letter and wait channel of one thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OsThreadState {
    /// `R`, `S`, `D`, `T`, ... (`None` if the thread is gone).
    pub(crate) state: Option<char>,
    /// Kernel function the thread sleeps in; `None` when running or unknown.
    pub(crate) wchan: Option<String>,
}

/// Reads the state of thread `tid` of this process.
pub(crate) fn read(tid: i64) -> OsThreadState {
    let dir = format!("/proc/self/task/{tid}");
    let state = std::fs::read_to_string(format!("{dir}/stat"))
        .ok()
        .and_then(|stat| parse_stat_state(&stat));
    let wchan = std::fs::read_to_string(format!("{dir}/wchan"))
        .ok()
        .and_then(|w| parse_wchan(&w));
    OsThreadState { state, wchan }
}

/// The state letter of a `stat` line. The command name (in parentheses) may
/// itself contain spaces and parentheses, so the state is the first field
/// after the *last* `)`.
pub(crate) fn parse_stat_state(stat: &str) -> Option<char> {
    stat_fields(stat)?.next()?.chars().next()
}

/// The fields of a `stat` line after the command name, from the state
/// (field 3) on. The name (in parentheses) may itself hold spaces and
/// parentheses, so they start after the *last* `)`.
pub(crate) fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

/// `wchan` holds a kernel symbol, or `0` when the thread is running.
pub(crate) fn parse_wchan(wchan: &str) -> Option<String> {
    let wchan = wchan.trim();
    (!wchan.is_empty() && wchan != "0").then(|| wchan.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_state_survives_odd_thread_names() {
        let stat = "4242 (kms-worker-0) S 1 4242 4242 0 -1 4194368 1 0 0 0";
        assert_eq!(parse_stat_state(stat), Some('S'));
        let odd = "17 (a) b (c)) D 1 17 17 0 -1";
        assert_eq!(parse_stat_state(odd), Some('D'));
        assert_eq!(parse_stat_state("garbage"), None);
        assert_eq!(parse_stat_state("1 (x)"), None);
    }

    #[test]
    fn wchan_zero_means_running() {
        assert_eq!(parse_wchan("0"), None);
        assert_eq!(parse_wchan(""), None);
        assert_eq!(
            parse_wchan("hrtimer_nanosleep"),
            Some("hrtimer_nanosleep".to_owned())
        );
    }

    #[test]
    fn reads_a_sleeping_thread_of_this_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (hold, wait) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(crate::runtime::threads::current_tid()).unwrap();
            let _ = wait.recv();
        });
        let tid = rx.recv().unwrap();
        // The thread blocks in recv(); wait until the kernel says so.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let state = loop {
            let s = read(tid);
            if s.state == Some('S') || std::time::Instant::now() > deadline {
                break s;
            }
            std::thread::yield_now();
        };
        assert_eq!(state.state, Some('S'));
        drop(hold);
        t.join().unwrap();
    }
}
