//! Coalescing of identical callouts in flight: while a `GET` (or `HEAD`) callout to a
//! cluster is waiting for its answer, another callout with the same cluster, method, path
//! and headers (and no body) waits for that answer instead of sending its own request.
//!
//! Why: a filter cannot make one request wait for another request's callout. On a cold
//! start (e.g. `jwt` with a remote JWKS, before the first fetch answered) every request
//! that arrives asks for the same document; without this each one fetched it.
//!
//! Process-wide: followers on any worker thread wait on the leader's answer (a `watch`
//! channel; the answer is plain data). The leader's request does the call on its own
//! worker, as any callout. A follower still applies its own timeout; if the leader goes
//! away before the answer (its client disconnected), its followers each call for
//! themselves. An answer is served to identical callouts only until the leader's filter
//! has handled it (so that one does not miss, say, a JWKS the filter is about to store),
//! then forgotten: this is not a cache.

use super::bindings::wasmesh::filter::types as wt;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use tokio::sync::watch;

/// Distinct callouts in flight that can be joined; past this, callouts go alone.
const MAX_IN_FLIGHT: usize = 1024;

type Answer = Result<wt::CalloutResponse, String>;
type Slot = watch::Sender<Option<Answer>>;

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    cluster: String,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

fn in_flight() -> &'static Mutex<HashMap<Key, Slot>> {
    static MAP: OnceLock<Mutex<HashMap<Key, Slot>>> = OnceLock::new();
    MAP.get_or_init(|| Mutex::new(HashMap::new()))
}

/// What a callout does about identical callouts in flight.
pub enum Role {
    /// Not coalesced (not a `GET`/`HEAD` without body, or too many in flight).
    Alone,
    /// Send the request, then hand the answer to [`Leader::finish`].
    Leader(Leader),
    /// Wait for the leader's answer with [`wait`].
    Follower(watch::Receiver<Option<Answer>>),
}

/// Join the identical callout in flight, or become the one others join.
pub fn join(c: &wt::CalloutRequest) -> Role {
    if !(c.method == "GET" || c.method == "HEAD") || !c.body.is_empty() {
        return Role::Alone;
    }
    let key = Key {
        cluster: c.cluster.clone(),
        method: c.method.clone(),
        path: c.path.clone(),
        headers: c.headers.clone(),
    };
    let mut map = in_flight().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(tx) = map.get(&key) {
        return Role::Follower(tx.subscribe());
    }
    if map.len() >= MAX_IN_FLIGHT {
        return Role::Alone;
    }
    let (tx, _) = watch::channel(None);
    map.insert(key.clone(), tx.clone());
    Role::Leader(Leader { key, tx })
}

/// The leader's answer; `None` when the leader went away without one.
pub async fn wait(mut rx: watch::Receiver<Option<Answer>>) -> Option<Answer> {
    match rx.wait_for(Option::is_some).await {
        Ok(answer) => answer.clone(),
        Err(_) => None,
    }
}

/// The callout that sends the request; others join it until it is dropped.
pub struct Leader {
    key: Key,
    tx: Slot,
}

impl Leader {
    /// Give the answer to the followers, and to identical callouts made until the leader
    /// is dropped (the caller drops it once its filter has seen the answer, so a request
    /// arriving in between gets this answer rather than calling again).
    pub fn publish(&self, answer: &Answer) {
        self.tx.send_replace(Some(answer.clone()));
    }

    fn unregister(&self) {
        let mut map = in_flight().lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|tx| tx.same_channel(&self.tx))
        {
            map.remove(&self.key);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Done, or cancelled: either way new callouts start afresh, and the followers of a
        // cancelled leader see the channel close.
        self.unregister();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> wt::CalloutRequest {
        wt::CalloutRequest {
            cluster: "idp".into(),
            method: "GET".into(),
            path: path.into(),
            headers: vec![],
            body: vec![],
            timeout_millis: 0,
        }
    }

    #[tokio::test]
    async fn followers_get_the_leaders_answer_then_it_is_forgotten() {
        let Role::Leader(leader) = join(&get("/coalesce-a")) else {
            panic!("the first callout leads");
        };
        let Role::Follower(rx) = join(&get("/coalesce-a")) else {
            panic!("the second follows");
        };
        assert!(matches!(join(&get("/coalesce-other")), Role::Leader(_)));
        let mut post = get("/coalesce-a");
        post.method = "POST".into();
        assert!(matches!(join(&post), Role::Alone));
        let waiter = tokio::spawn(wait(rx));
        leader.publish(&Err("boom".into()));
        let answer = waiter.await.expect("join");
        assert!(matches!(answer, Some(Err(e)) if e == "boom"));
        // Until the leader is dropped, a late identical callout gets the answer at once.
        let Role::Follower(late) = join(&get("/coalesce-a")) else {
            panic!("the leader still serves its answer");
        };
        assert!(matches!(wait(late).await, Some(Err(e)) if e == "boom"));
        drop(leader);
        assert!(matches!(join(&get("/coalesce-a")), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_cancelled_leader_releases_its_followers() {
        let Role::Leader(leader) = join(&get("/coalesce-b")) else {
            panic!("the first callout leads");
        };
        let Role::Follower(rx) = join(&get("/coalesce-b")) else {
            panic!("the second follows");
        };
        drop(leader);
        assert!(wait(rx).await.is_none());
        assert!(matches!(join(&get("/coalesce-b")), Role::Leader(_)));
    }
}
