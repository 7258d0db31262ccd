//! The HTML report renders in headless Chromium with no script errors and
//! the timeline present. Skips loudly when `chromium` is not installed
//! (`.ci/run` installs it).

mod fixture;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kms_collector::report::{build_report, render_html, ReportOptions};

/// What Chromium made of a page.
struct Rendered {
    dom: String,
    console_errors: Vec<String>,
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Loads `page` in headless Chromium; returns the DOM after scripts ran and
/// the console errors it logged.
#[track_caller]
fn render(browser: &str, page: &Path) -> Rendered {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = tempfile::NamedTempFile::new().expect("stdout file");
    let err = tempfile::NamedTempFile::new().expect("stderr file");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=2000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("file://{}", page.display()))
        .stdout(out.reopen().expect("stdout"))
        .stderr(err.reopen().expect("stderr"))
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait chromium").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dom = std::fs::read_to_string(out.path()).unwrap_or_default();
    let log = std::fs::read_to_string(err.path()).unwrap_or_default();
    let console_errors = log
        .lines()
        .filter(|l| l.contains("CONSOLE") && (l.contains("Uncaught") || l.contains("Error")))
        .map(str::to_owned)
        .collect();
    Rendered {
        dom,
        console_errors,
    }
}

fn html_of(fixture_name: &str) -> String {
    let f = fixture::load_fixture(&fixture::fixtures_dir().join(format!("{fixture_name}.json")));
    let store = fixture::load(&f);
    let report = build_report(&store.reader(), &ReportOptions::default()).expect("report");
    render_html(&report)
}

#[test]
fn html_report_renders_in_chromium_with_timeline_and_no_script_errors() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED: chromium is not installed; the HTML report was not rendered (.ci/run installs it)");
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    for name in ["d_stall", "b_webhook_hang", "empty"] {
        let html = html_of(name);
        // Self-contained: nothing to fetch (the SVG namespace URI is a name, not a load).
        for needle in ["<link", "src=", "href=\"http", "url(", "@import"] {
            assert!(
                !html.contains(needle),
                "{name}: the page must not load anything ({needle})"
            );
        }
        let page = dir.path().join(format!("{name}.html"));
        std::fs::write(&page, &html).expect("write page");
        let r = render(browser, &page);
        assert!(
            r.console_errors.is_empty(),
            "{name}: script errors: {:?}",
            r.console_errors
        );
        assert!(
            r.dom.contains("data-ready=\"timeline\""),
            "{name}: the page script did not run or found no timeline:\n{}",
            &r.dom[..r.dom.len().min(2000)]
        );
        assert!(
            r.dom.contains("<svg id=\"timeline\""),
            "{name}: no timeline"
        );
        assert!(
            r.dom.contains("id=\"verdicts\""),
            "{name}: no verdict table"
        );
        if name != "empty" {
            assert!(r.dom.contains("class=\"bar\""), "{name}: no open-span bars");
            assert!(r.dom.contains("<polyline"), "{name}: no series drawn");
        }
    }
}

/// The harness itself: a page with a broken script is caught, so the test
/// above can fail.
#[test]
fn html_harness_catches_script_errors() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED: chromium is not installed");
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let page = dir.path().join("broken.html");
    std::fs::write(
        &page,
        "<!DOCTYPE html><html><body><script>document.body.dataset.x = undefinedThing.y;</script></body></html>",
    )
    .expect("write");
    let r = render(browser, &page);
    assert!(
        !r.console_errors.is_empty(),
        "a ReferenceError went unnoticed"
    );
}

/// Writes the HTML reports of all fixtures to `$KMS_REPORT_HTML_DIR` for a
/// look by eye (does nothing unless the variable is set).
#[test]
fn write_html_reports_for_review() {
    let Some(dir) = std::env::var_os("KMS_REPORT_HTML_DIR") else {
        return;
    };
    for (name, _) in fixture::all_fixtures() {
        std::fs::write(Path::new(&dir).join(format!("{name}.html")), html_of(&name))
            .expect("write");
    }
}
