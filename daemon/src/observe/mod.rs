//! Observability: the event stream behind `GET /v1/events` (server-sent
//! events), the per-VM samples behind `GET /v1/stats` and their Prometheus
//! rendering for `GET /metrics`.
//!
//! Events go through one tokio broadcast channel: the places in `vms` that
//! change a VM's state publish a [`Event::Vm`], the console pump feeds each
//! chunk of output to a [`ConsoleTap`] (console events for `?console=1`
//! subscribers, one `panic` event per run when a line shows `Kernel panic`).
//! A subscriber that falls behind by more than [`EVENT_BUFFER`] events
//! misses some (it is told so with a comment); publishers never block.
//!
//! Samples: CPU time and RSS of each running VM's `vireo run` process from
//! /proc, and the VM's own counters (vCPU exits, disk and network I/O) from
//! its control socket's `stats` command.
//!
//! Layout: `events` (the event types and a subscriber's filter),
//! `console_tap` (console output and kernel-panic detection), `stats` (the
//! samples and their REST types), `metrics` (the API request counters and
//! the Prometheus text); this file holds the channel and its shutdown.

mod console_tap;
mod events;
mod metrics;
mod stats;

pub use console_tap::{ConsoleTap, PANIC_MARKER};
pub use events::{
    now_rfc3339, Change, ConsoleEvent, Event, EventFilter, PanicEvent, VmEvent, EVENT_BUFFER,
};
pub use metrics::{escape_label, render_prometheus, RequestCounters};
pub use stats::{sample, StatsList, VmStats, STATS_TIMEOUT};

use tokio::sync::broadcast;

use vireo_api::model::VmState;

/// The daemon's observability state: the event channel and the API request
/// counters.
pub struct Observe {
    events: broadcast::Sender<Event>,
    /// Set when the daemon shuts down: event streams end (an open stream
    /// would otherwise keep the graceful shutdown waiting forever).
    closing: tokio::sync::watch::Sender<bool>,
    /// Only `/metrics` reads them.
    pub requests: RequestCounters,
}

impl Default for Observe {
    fn default() -> Self {
        Observe {
            events: broadcast::channel(EVENT_BUFFER).0,
            closing: tokio::sync::watch::channel(false).0,
            requests: RequestCounters::default(),
        }
    }
}

impl Observe {
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Tells event streams to end (`closing()` resolves).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`Observe::close`] has been called.
    pub fn closing(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            let _ = rx.wait_for(|closed| *closed).await;
        }
    }

    pub fn publish(&self, e: Event) {
        // An error only means nobody listens.
        let _ = self.events.send(e);
    }

    /// Publish a VM state change.
    pub fn vm(&self, name: &str, change: Change, state: Option<VmState>, reason: &str) {
        self.publish(Event::Vm(VmEvent {
            name: name.to_string(),
            event: change,
            state: state.map_or("deleted", VmState::as_str).to_string(),
            reason: reason.to_string(),
            time: now_rfc3339(),
        }));
    }

    /// A tap for the console pump of VM `name`.
    pub fn console_tap(&self, name: &str) -> ConsoleTap {
        ConsoleTap::new(name, self.events.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_as_the_contract_says() {
        let o = Observe::default();
        let mut rx = o.subscribe();
        o.vm("a", Change::Stopped, Some(VmState::Stopped), "powered off");
        o.vm("a", Change::Deleted, None, "deleted");
        let e = rx.try_recv().unwrap();
        assert_eq!(e.kind(), "vm");
        let v: serde_json::Value = serde_json::from_str(&e.data()).unwrap();
        assert_eq!(v["name"], "a");
        assert_eq!(v["event"], "stopped");
        assert_eq!(v["state"], "stopped");
        assert_eq!(v["reason"], "powered off");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        let v: serde_json::Value = serde_json::from_str(&rx.try_recv().unwrap().data()).unwrap();
        assert_eq!(
            (&v["event"], &v["state"]),
            (&"deleted".into(), &"deleted".into())
        );
    }
}
