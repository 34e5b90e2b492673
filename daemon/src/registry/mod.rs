//! The registry: which containers exist, where their cgroups are, and the machinery that
//! keeps it true: files beside the socket (a snapshot and a journal of changes since, see
//! `store`; a burst of registrations shares one append), and inotify watches
//! that drop a container whose cgroup disappears without a poststop.
//!
//! It publishes what changes as [`RegistryEvent`]s to subscribers (the observer today,
//! enforcers and the NRI plugin next). Publishing never waits: each subscriber has an
//! unbounded channel of its own, and [`Registry::subscribe`] hands a new one the current
//! state and its channel atomically, so nothing is missed or seen twice.
//!
//! A removed container is not forgotten until its bill is recorded: it stays in the
//! file as a departure until a consumer calls [`Registry::settle`], so a `kill -9` between
//! the removal and the bill leaves the departure for the next start to bill.
//!
//! cgroupfs does not deliver `IN_DELETE_SELF` for a removed cgroup (measured on 6.18), but
//! it does deliver `IN_DELETE` on the parent directory, so the watches are on parents:
//! one per distinct parent (`/system.slice`, `/kubepods.slice/…`), however many
//! containers live under it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use dove_cgroup::Mounts;
use dove_proto::{Container, Registration, RemovalReason};
use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::{watch, Notify};

pub mod store;

pub use store::Departure;
use store::{JournalRecord, Store};

/// What an unregistration says about the container it means, beside its ID.
#[derive(Debug, Clone, Copy, Default)]
pub struct Named<'a> {
    pub cgroup_path: Option<&'a str>,
    pub bundle: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Invalid(#[from] dove_proto::ValidationError),
    #[error("{0}")]
    Path(#[from] dove_cgroup::CgroupError),
    #[error("cgroup {dir} does not exist: the container is gone, or cgroup_path is wrong")]
    Gone { dir: PathBuf },
    #[error("cgroup_id {claimed} does not match {dir}, whose ID is {actual}: the cgroup was recreated or the hook resolved the wrong one")]
    IdMismatch {
        dir: PathBuf,
        claimed: u64,
        actual: u64,
    },
    #[error("cannot watch {dir} for removal: {source}")]
    Watch { dir: PathBuf, source: io::Error },
    #[error("the container is in the root cgroup: DOVE charges per container cgroup, and the root cannot be one")]
    RootCgroup,
    #[error("registered in memory but not saved to disk: {0}; a daemon restart would forget it")]
    Persist(String),
    #[error(
        "container {id} was registered by uid {owner}: only it or root may replace or remove it"
    )]
    NotOwner { id: String, owner: u32 },
    #[error("uid {uid} has {MAX_PER_USER} containers registered, the most a non-root user may")]
    TooMany { uid: u32 },
}

/// Where a container's removal shows up: the watch on its cgroup's parent directory
/// and the cgroup's name within it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watch {
    parent: WatchDescriptor,
    child: String,
}

struct Entry {
    container: Container,
    watch: Watch,
}

/// What subscribers are told, in the order it happened.
#[derive(Debug, Clone)]
pub enum RegistryEvent {
    /// A container joined, or re-registered (same ID; the cgroup may be the same one).
    Registered(Container),
    /// A container left; its bill is owed until [`Registry::settle`].
    Removed(Departure),
}

/// What a new subscriber starts from.
pub struct Subscription {
    pub containers: Vec<Container>,
    /// Removals whose bills are not recorded yet (from before a restart, or before this
    /// subscriber came).
    pub departures: Vec<Departure>,
    pub events: mpsc::Receiver<RegistryEvent>,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    departures: Vec<Departure>,
    subscribers: Vec<mpsc::Sender<RegistryEvent>>,
    /// Whether removals wait for a bill (false when nothing computes bills).
    billing: bool,
    /// parent watch → child cgroup name → container IDs. One cgroup may carry several
    /// IDs (re-registration under a new ID after a runtime crash).
    watched: HashMap<WatchDescriptor, HashMap<String, BTreeSet<String>>>,
    generation: u64,
    /// Changes not yet in the journal.
    pending: Vec<JournalRecord>,
    /// Records in the journal since the last snapshot.
    journal_len: usize,
    /// Write a whole snapshot next (at start, and after a failed write lost records).
    needs_snapshot: bool,
}

impl Inner {
    fn publish(&mut self, event: RegistryEvent) {
        self.subscribers.retain(|s| s.send(event.clone()).is_ok());
    }

    /// Journal a change; every change to what is persisted goes through here.
    fn record(&mut self, record: JournalRecord) {
        self.pending.push(record);
        self.generation += 1;
    }

    /// Take `id` out of the registry (journaled); its watch is the caller's to detach.
    fn remove_entry(&mut self, id: &str) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        self.record(JournalRecord::Remove { id: id.to_owned() });
        Some(entry)
    }

    fn depart(&mut self, container: Container, reason: RemovalReason) {
        let departure = Departure {
            container,
            reason,
            removed_at: now_rfc3339(),
        };
        if self.billing {
            self.departures.push(departure.clone());
            self.record(JournalRecord::Depart {
                departure: departure.clone(),
            });
        }
        self.publish(RegistryEvent::Removed(departure));
    }

    fn add_watched(&mut self, watch: &Watch, id: &str) {
        self.watched
            .entry(watch.parent.clone())
            .or_default()
            .entry(watch.child.clone())
            .or_default()
            .insert(id.to_owned());
    }
}

#[derive(Debug, Clone, Default)]
struct PersistState {
    done: u64,
    failed: u64,
    error: String,
}

/// Whether two cgroup paths name one container: equal, or one nested in the other (a
/// runtime may put the container's processes in a child of the cgroup it was given).
fn same_container(a: &str, b: &str) -> bool {
    // The root holds every cgroup and is never a container's.
    let nested = |outer: &str, inner: &str| {
        outer != "/"
            && inner
                .strip_prefix(outer.trim_end_matches('/'))
                .is_some_and(|rest| rest.starts_with('/'))
    };
    a == b || nested(a, b) || nested(b, a)
}

/// Containers a non-root user may have registered at once (rootless mode): enough for a
/// busy CI user, far below the observer's slots.
pub const MAX_PER_USER: usize = 256;

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

pub struct Registry {
    inner: Mutex<Inner>,
    mounts: Mounts,
    watches: Mutex<Watches>,
    store: Store,
    persist_wanted: Notify,
    persist_lock: tokio::sync::Mutex<()>,
    /// The registry itself, for scheduling a retry of a failed write.
    retry_persist: std::sync::Weak<Registry>,
    persisted: watch::Sender<PersistState>,
    pub dropped_vanished: AtomicU64,
    pub persist_failures: AtomicU64,
}

/// The mask that tells us a child cgroup of a watched directory went away.
fn removal_mask() -> WatchMask {
    WatchMask::DELETE | WatchMask::ONLYDIR
}

impl Registry {
    /// Build the registry from disk, dropping entries whose cgroup is gone, and start the
    /// persister and the removal watcher on the current tokio runtime. With `billing`,
    /// removals are kept as departures until a subscriber settles their bills.
    pub fn start(mounts: Mounts, store: Store, billing: bool) -> io::Result<Arc<Self>> {
        let inotify = Inotify::init()?;
        let watches = inotify.watches();
        let events = inotify.into_event_stream(vec![0u8; 64 * 1024])?;
        let registry = Arc::new_cyclic(|weak| Self {
            retry_persist: weak.clone(),
            inner: Mutex::new(Inner {
                billing,
                needs_snapshot: true,
                ..Inner::default()
            }),
            mounts,
            watches: Mutex::new(watches),
            store,
            persist_wanted: Notify::new(),
            persist_lock: tokio::sync::Mutex::new(()),
            persisted: watch::Sender::new(PersistState::default()),
            dropped_vanished: AtomicU64::new(0),
            persist_failures: AtomicU64::new(0),
        });
        registry.reload();
        tokio::spawn(Arc::clone(&registry).persist_loop());
        tokio::spawn(Arc::clone(&registry).watch_loop(events));
        Ok(registry)
    }

    fn reload(&self) {
        let loaded = match self.store.load() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}");
                Default::default()
            }
        };
        let total = loaded.containers.len();
        let mut dropped = 0;
        let mut inner = self.lock();
        if inner.billing {
            inner.departures = loaded.departures;
        }
        for container in loaded.containers {
            let id = container.registration.id.clone();
            match self.attach(&mut inner, &container.registration) {
                Ok(watch) => {
                    inner.add_watched(&watch, &id);
                    inner.entries.insert(id, Entry { container, watch });
                }
                Err(e) => {
                    dropped += 1;
                    tracing::info!(%id, "dropped at startup: {e}");
                    inner.depart(container, RemovalReason::CgroupRemoved);
                }
            }
        }
        tracing::info!(
            kept = total - dropped,
            dropped,
            unbilled = inner.departures.len(),
            path = %self.store.path().display(),
            "registry loaded"
        );
        // The first write is a snapshot of what was loaded.
        inner.generation += 1;
        drop(inner);
        self.persist_wanted.notify_one();
    }

    /// The current containers, unbilled departures, and every change from now on.
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = mpsc::channel();
        let mut inner = self.lock();
        inner.subscribers.push(tx);
        Subscription {
            containers: inner
                .entries
                .values()
                .map(|e| e.container.clone())
                .collect(),
            departures: inner.departures.clone(),
            events: rx,
        }
    }

    /// `departure`'s bill is recorded: forget it.
    pub fn settle(&self, departure: &Departure) {
        let mut inner = self.lock();
        let before = inner.departures.len();
        inner.departures.retain(|d| d != departure);
        if inner.departures.len() != before {
            inner.record(JournalRecord::Settle {
                departure: departure.clone(),
            });
            drop(inner);
            self.persist_wanted.notify_one();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; the data is still consistent
        // because every mutation is a single insert/remove, so keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watch the container's cgroup for removal and check it is the cgroup the client
    /// named. The watch is added before the check, so a removal racing with registration
    /// is either seen by the check or delivered as an event afterwards.
    fn attach(&self, inner: &mut Inner, reg: &Registration) -> Result<Watch, RegisterError> {
        reg.validate()?;
        let dir = self.mounts.unified.dir(&reg.cgroup_path)?;
        let (Some(parent), Some(child)) = (dir.parent(), dir.file_name()) else {
            return Err(RegisterError::RootCgroup);
        };
        if reg.cgroup_path == "/" {
            return Err(RegisterError::RootCgroup);
        }
        let child = child.to_string_lossy().into_owned();
        let wd = self
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(parent, removal_mask())
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => RegisterError::Gone { dir: dir.clone() },
                _ => RegisterError::Watch {
                    dir: dir.clone(),
                    source,
                },
            })?;
        let check = match std::fs::metadata(&dir) {
            Ok(m) if m.ino() == reg.cgroup_id => Ok(()),
            Ok(m) => Err(RegisterError::IdMismatch {
                dir: dir.clone(),
                claimed: reg.cgroup_id,
                actual: m.ino(),
            }),
            Err(_) => Err(RegisterError::Gone { dir }),
        };
        if let Err(e) = check {
            if !inner.watched.contains_key(&wd) {
                self.unwatch(wd);
            }
            return Err(e);
        }
        Ok(Watch { parent: wd, child })
    }

    fn unwatch(&self, wd: WatchDescriptor) {
        // EINVAL here means the kernel already dropped the watch (directory removed).
        let _ = self
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(wd);
    }

    fn detach(&self, inner: &mut Inner, id: &str, watch: &Watch) {
        let Some(children) = inner.watched.get_mut(&watch.parent) else {
            return;
        };
        if let Some(ids) = children.get_mut(&watch.child) {
            ids.remove(id);
            if ids.is_empty() {
                children.remove(&watch.child);
            }
        }
        if children.is_empty() {
            inner.watched.remove(&watch.parent);
            self.unwatch(watch.parent.clone());
        }
    }

    /// Add or replace a container; returns whether one with this ID was replaced, once the
    /// change is on disk.
    ///
    /// `by` is the peer's uid: a non-root peer may not replace another uid's entry, and
    /// may hold at most [`MAX_PER_USER`] entries.
    pub async fn register(&self, reg: Registration, by: u32) -> Result<bool, RegisterError> {
        let generation;
        let replaced;
        {
            let mut inner = self.lock();
            if by != 0 {
                if let Some(owner) = inner
                    .entries
                    .get(&reg.id)
                    .map(|e| e.container.registered_by)
                    .filter(|owner| *owner != by)
                {
                    return Err(RegisterError::NotOwner { id: reg.id, owner });
                }
                let held = inner
                    .entries
                    .values()
                    .filter(|e| {
                        e.container.registered_by == by && e.container.registration.id != reg.id
                    })
                    .count();
                if held >= MAX_PER_USER {
                    return Err(RegisterError::TooMany { uid: by });
                }
            }
            let watch = self.attach(&mut inner, &reg)?;
            let id = reg.id.clone();
            let container = Container {
                registration: reg,
                registered_at: now_rfc3339(),
                registered_by: by,
            };
            let old = inner.entries.insert(
                id.clone(),
                Entry {
                    container: container.clone(),
                    watch: watch.clone(),
                },
            );
            replaced = old.is_some();
            if let Some(old) = old {
                if old.watch != watch {
                    self.detach(&mut inner, &id, &old.watch);
                }
                if old.container.registration.cgroup_id != container.registration.cgroup_id {
                    inner.depart(old.container, RemovalReason::Replaced);
                }
            }
            inner.publish(RegistryEvent::Registered(container.clone()));
            inner.add_watched(&watch, &id);
            inner.record(JournalRecord::Put { container });
            generation = inner.generation;
        }
        self.persist_through(generation)
            .await
            .map_err(RegisterError::Persist)?;
        Ok(replaced)
    }

    /// Remove a container; returns whether it was registered, once the change is on disk.
    /// Another container may have registered the same ID since (IDs are unique per runtime
    /// and root only), so what the client names must match: the bundle where both sides
    /// have one, else the cgroup (the registered one, one nested in it, or one holding it).
    pub async fn unregister(
        &self,
        id: &str,
        named: Named<'_>,
        by: u32,
    ) -> Result<bool, RegisterError> {
        let generation = {
            let mut inner = self.lock();
            let Some(entry) = inner.entries.get(id) else {
                return Ok(false);
            };
            let owner = entry.container.registered_by;
            if by != 0 && owner != by {
                return Err(RegisterError::NotOwner {
                    id: id.to_owned(),
                    owner,
                });
            }
            let reg = &entry.container.registration;
            let registered = reg.cgroup_path.as_str();
            // On a hybrid host the runtime's cgroupsPath names the `cpu` hierarchy's cgroup,
            // and the container may sit in another v2 cgroup (crun leaves it where it
            // started).
            let names_it = |named: &&str| {
                same_container(registered, named) || reg.cpu_cgroup_path.as_deref() == Some(*named)
            };
            match (named.bundle, reg.bundle.as_deref()) {
                (Some(named), Some(registered)) if named != registered => {
                    tracing::warn!(
                        %id,
                        registered,
                        named,
                        "unregistration names another bundle than the registered one: left alone (another container reused the ID)"
                    );
                    return Ok(false);
                }
                (Some(_), Some(_)) => {}
                _ => {
                    if let Some(named) = named.cgroup_path.filter(|named| !names_it(named)) {
                        tracing::warn!(
                            %id,
                            registered,
                            named,
                            "unregistration names another cgroup than the registered one: left alone (another container reused the ID)"
                        );
                        return Ok(false);
                    }
                }
            }
            let entry = inner.remove_entry(id).expect("looked up above");
            self.detach(&mut inner, id, &entry.watch);
            inner.depart(entry.container, RemovalReason::Unregistered);
            inner.generation
        };
        self.persist_through(generation)
            .await
            .map_err(RegisterError::Persist)?;
        Ok(true)
    }

    pub fn list(&self) -> Vec<Container> {
        self.lock()
            .entries
            .values()
            .map(|e| e.container.clone())
            .collect()
    }

    pub fn find(&self, id: &str) -> Option<Container> {
        self.lock().entries.get(id).map(|e| e.container.clone())
    }

    /// The cgroup v2 IDs of every registered container.
    pub fn cgroup_ids(&self) -> BTreeSet<u64> {
        self.lock()
            .entries
            .values()
            .map(|e| e.container.registration.cgroup_id)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Return once the registry is on disk through `generation`. With no write in
    /// flight (the common case) the caller writes it: a journal append to the page cache
    /// is shorter than handing it to the persister and being woken by it. Otherwise the
    /// persister's next write covers it, and a burst shares that write.
    async fn persist_through(&self, generation: u64) -> Result<(), String> {
        match self.persist_lock.try_lock() {
            Ok(writing) => self.persist_locked(writing).await,
            Err(_) => self.persist_wanted.notify_one(),
        }
        self.wait_persisted(generation).await
    }

    async fn wait_persisted(&self, generation: u64) -> Result<(), String> {
        let mut rx = self.persisted.subscribe();
        loop {
            {
                let state = rx.borrow_and_update();
                if state.done >= generation {
                    return Ok(());
                }
                if state.failed >= generation {
                    return Err(state.error.clone());
                }
            }
            if rx.changed().await.is_err() {
                return Err("the persister stopped".into());
            }
        }
    }

    /// Write the registry whenever it changed. Writers that arrive while a write is in
    /// flight are all covered by the next one: one fsync serves a whole burst.
    async fn persist_loop(self: Arc<Self>) {
        loop {
            self.persist_wanted.notified().await;
            self.persist_now().await;
        }
    }

    /// Write the current registry and report the outcome to waiters.
    pub async fn persist_now(&self) {
        // One writer at a time: journal records must land in the order they happened.
        let writing = self.persist_lock.lock().await;
        self.persist_locked(writing).await;
    }

    async fn persist_locked(&self, _writing: tokio::sync::MutexGuard<'_, ()>) {
        enum Write {
            /// The records go to the journal first: a crash between the snapshot's rename
            /// and the journal's truncation then replays the complete history over the
            /// snapshot, which ends where the snapshot does.
            Snapshot(Vec<JournalRecord>, Vec<u8>),
            Append(Vec<JournalRecord>),
        }
        let (generation, write) = {
            let mut inner = self.lock();
            let records = std::mem::take(&mut inner.pending);
            let compact = inner.needs_snapshot
                || inner.journal_len + records.len() > (2 * inner.entries.len()).max(1024);
            let write = if compact {
                let containers: Vec<Container> = inner
                    .entries
                    .values()
                    .map(|e| e.container.clone())
                    .collect();
                inner.needs_snapshot = false;
                inner.journal_len = 0;
                Write::Snapshot(records, Store::encode(containers, inner.departures.clone()))
            } else {
                inner.journal_len += records.len();
                Write::Append(records)
            };
            (inner.generation, write)
        };
        let store = self.store.clone();
        let result = match write {
            Write::Append(records) if records.is_empty() => Ok(()),
            // A few lines appended to the page cache (no fsync: see `store`): done here.
            Write::Append(records) => store.append(&records).map_err(|e| e.to_string()),
            // A whole registry (megabytes with 10,000 containers) is written off the
            // runtime's threads.
            Write::Snapshot(records, bytes) => tokio::task::spawn_blocking(move || {
                store
                    .append(&records)
                    .and_then(|()| store.save_snapshot(&bytes))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string())),
        };
        match result {
            Ok(()) => self
                .persisted
                .send_modify(|s| s.done = s.done.max(generation)),
            Err(error) => {
                // The records are gone from `pending`: the next write is a whole snapshot,
                // tried again in a second even if nothing else changes.
                self.lock().needs_snapshot = true;
                if let Some(retry) = self.retry_persist.upgrade() {
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        retry.persist_wanted.notify_one();
                    });
                }
                self.persist_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!("saving the registry failed: {error}");
                self.persisted.send_modify(|s| {
                    s.failed = s.failed.max(generation);
                    s.error = error;
                });
            }
        }
    }

    async fn watch_loop(self: Arc<Self>, mut events: inotify::EventStream<Vec<u8>>) {
        while let Some(event) = events.next().await {
            match event {
                Ok(event) if event.mask.contains(EventMask::Q_OVERFLOW) => {
                    tracing::warn!("inotify queue overflowed; checking every registered cgroup");
                    self.sweep();
                }
                Ok(event) => self.cgroup_event(&event.wd, event.mask, event.name.as_deref()),
                Err(e) => {
                    tracing::error!("reading inotify events failed: {e}; falling back to sweeps");
                    return;
                }
            }
        }
    }

    fn cgroup_event(&self, wd: &WatchDescriptor, mask: EventMask, name: Option<&std::ffi::OsStr>) {
        let mut inner = self.lock();
        let Some(children) = inner.watched.get(wd) else {
            return;
        };
        let ids: Vec<String> = if mask.contains(EventMask::IGNORED) {
            children.values().flatten().cloned().collect()
        } else {
            let Some(name) = name.map(|n| n.to_string_lossy()) else {
                return;
            };
            children
                .get(name.as_ref())
                .into_iter()
                .flatten()
                .cloned()
                .collect()
        };
        let mut changed = false;
        for id in &ids {
            changed |= self.drop_if_vanished(&mut inner, id);
        }
        if mask.contains(EventMask::IGNORED) {
            // The parent itself went (or was unmounted): whatever is still registered
            // under it needs a new watch.
            if let Some(left) = inner.watched.remove(wd) {
                for id in left.into_values().flatten() {
                    changed |= self.rewatch(&mut inner, &id);
                }
            }
        }
        if changed {
            drop(inner);
            self.persist_wanted.notify_one();
        }
    }

    /// Returns whether the entry had to be dropped.
    fn rewatch(&self, inner: &mut Inner, id: &str) -> bool {
        let Some(reg) = inner
            .entries
            .get(id)
            .map(|e| e.container.registration.clone())
        else {
            return false;
        };
        match self.attach(inner, &reg) {
            Ok(watch) => {
                inner.add_watched(&watch, id);
                if let Some(e) = inner.entries.get_mut(id) {
                    e.watch = watch;
                }
                false
            }
            Err(e) => {
                if let Some(entry) = inner.remove_entry(id) {
                    inner.depart(entry.container, RemovalReason::CgroupRemoved);
                }
                self.dropped_vanished.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%id, "dropped: {e}");
                true
            }
        }
    }

    /// Drop `id` if its cgroup no longer exists (or was replaced by another with the same
    /// path). Returns whether it was dropped.
    fn drop_if_vanished(&self, inner: &mut Inner, id: &str) -> bool {
        let Some(entry) = inner.entries.get(id) else {
            return false;
        };
        let reg = &entry.container.registration;
        let alive = self
            .mounts
            .unified
            .dir(&reg.cgroup_path)
            .ok()
            .and_then(|d| std::fs::metadata(d).ok())
            .is_some_and(|m| m.ino() == reg.cgroup_id);
        if alive {
            return false;
        }
        tracing::info!(
            %id,
            cgroup = %reg.cgroup_path,
            "cgroup removed without a poststop (runtime crash or missed hook); container dropped"
        );
        let watch = entry.watch.clone();
        if let Some(entry) = inner.remove_entry(id) {
            inner.depart(entry.container, RemovalReason::CgroupRemoved);
        }
        self.detach(inner, id, &watch);
        self.dropped_vanished.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Check every registered cgroup still exists: the safety net for lost events.
    pub fn sweep(&self) {
        let mut inner = self.lock();
        let ids: Vec<String> = inner.entries.keys().cloned().collect();
        let mut changed = false;
        for id in ids {
            changed |= self.drop_if_vanished(&mut inner, &id);
        }
        if changed {
            drop(inner);
            self.persist_wanted.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_container;

    #[test]
    fn cgroups_of_one_container() {
        assert!(same_container("/a/b", "/a/b"));
        assert!(same_container("/a/b", "/a/b/container"));
        assert!(same_container("/a/b/container", "/a/b"));
        assert!(!same_container("/a/b", "/a/bc"));
        assert!(!same_container("/a/b", "/a/c"));
        assert!(!same_container("/machine.slice/libpod-1.scope", "/1"));
        assert!(!same_container("/", "/a"));
        assert!(!same_container("/a", "/"));
    }
}
