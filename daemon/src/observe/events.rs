//! The events of `GET /v1/events`: what they say, how they serialize for
//! server-sent events, and which ones a subscriber asked for.

use serde::{Deserialize, Serialize};

/// Events a slow subscriber may fall behind by before it misses some.
pub const EVENT_BUFFER: usize = 1024;

/// What changed about a VM (the `event` member of a `vm` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Created,
    Started,
    Paused,
    Resumed,
    Stopped,
    Crashed,
    Deleted,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Started => "started",
            Change::Paused => "paused",
            Change::Resumed => "resumed",
            Change::Stopped => "stopped",
            Change::Crashed => "crashed",
            Change::Deleted => "deleted",
        }
    }
}

/// `event: vm`: a VM's state changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmEvent {
    pub name: String,
    /// The change: created, started, paused, resumed, stopped, crashed,
    /// deleted.
    pub event: Change,
    /// The VM's state after the change (`stopped`, `running`, `paused`,
    /// `crashed`; `deleted` once it is gone).
    pub state: String,
    /// Why, in words: the exit reason for stopped and crashed, else the
    /// change itself ("created", "started on request", ...).
    pub reason: String,
    /// RFC 3339, UTC, with milliseconds.
    pub time: String,
}

/// `event: panic`: the VM's console showed a kernel panic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PanicEvent {
    pub name: String,
    /// The console line that shows it.
    pub line: String,
    pub time: String,
}

/// `event: console` (only with `?console=1`): a chunk of console output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleEvent {
    pub name: String,
    /// The bytes as UTF-8 (invalid sequences replaced).
    pub data: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Vm(VmEvent),
    Panic(PanicEvent),
    Console(ConsoleEvent),
}

impl Event {
    pub fn vm_name(&self) -> &str {
        match self {
            Event::Vm(e) => &e.name,
            Event::Panic(e) => &e.name,
            Event::Console(e) => &e.name,
        }
    }

    /// The SSE `event:` name.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Vm(_) => "vm",
            Event::Panic(_) => "panic",
            Event::Console(_) => "console",
        }
    }

    /// The SSE `data:` payload (one line of JSON).
    pub fn data(&self) -> String {
        let v = match self {
            Event::Vm(e) => serde_json::to_string(e),
            Event::Panic(e) => serde_json::to_string(e),
            Event::Console(e) => serde_json::to_string(e),
        };
        v.unwrap_or_else(|_| "{}".into())
    }
}

/// What a subscriber asked for: `?vm=NAME` and `?console=1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub vm: Option<String>,
    pub console: bool,
}

impl EventFilter {
    /// Parse the query string of `GET /v1/events`. Errors name the
    /// parameter.
    pub fn from_query(query: Option<&str>) -> Result<EventFilter, String> {
        let mut f = EventFilter::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "vm" => {
                    vireo_api::model::check_name(value)
                        .map_err(|e| format!("vm: {}", e.message.trim_start_matches("name: ")))?;
                    f.vm = Some(value.to_string());
                }
                "console" => {
                    f.console = match value {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        other => {
                            return Err(format!(
                                "console: {other:?} is not a boolean; use console=1"
                            ))
                        }
                    }
                }
                // Tokens travel in the query string for browsers (the auth
                // layer reads them); other parameters are ignored, as HTTP
                // APIs commonly do with cache-busting ones.
                _ => {}
            }
        }
        Ok(f)
    }

    pub fn matches(&self, e: &Event) -> bool {
        if matches!(e, Event::Console(_)) && !self.console {
            return false;
        }
        self.vm.as_deref().is_none_or(|vm| vm == e.vm_name())
    }
}

/// RFC 3339 UTC with milliseconds, for event times.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_event(name: &str) -> Event {
        Event::Vm(VmEvent {
            name: name.into(),
            event: Change::Started,
            state: "running".into(),
            reason: "started".into(),
            time: now_rfc3339(),
        })
    }

    fn console(name: &str) -> Event {
        Event::Console(ConsoleEvent {
            name: name.into(),
            data: "x".into(),
        })
    }

    #[test]
    fn filters_select_by_vm_and_console() {
        let all = EventFilter::from_query(None).unwrap();
        assert!(all.matches(&vm_event("a")));
        assert!(!all.matches(&console("a")), "console only when asked");
        let f = EventFilter::from_query(Some("vm=web&console=1")).unwrap();
        assert_eq!(
            f,
            EventFilter {
                vm: Some("web".into()),
                console: true
            }
        );
        assert!(f.matches(&vm_event("web")) && f.matches(&console("web")));
        assert!(!f.matches(&vm_event("db")) && !f.matches(&console("db")));
        let f = EventFilter::from_query(Some("console=0&access_token=abc")).unwrap();
        assert!(!f.console && f.vm.is_none());
        let e = EventFilter::from_query(Some("console=maybe")).unwrap_err();
        assert!(e.starts_with("console: "), "{e}");
        let e = EventFilter::from_query(Some("vm=../x")).unwrap_err();
        assert!(e.starts_with("vm: "), "{e}");
        let e = EventFilter::from_query(Some("vm=")).unwrap_err();
        assert!(e.starts_with("vm: "), "{e}");
    }
}
