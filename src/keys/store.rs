//! The key dictionary `.tdefs/keys`: the wrapped dictionary key plus every data key, sealed.
//! Small and rarely written, so every change rewrites it whole, atomically and durably.
//!
//! Layout: header | u8 len + master backend kind | u32 len + wrapped dictionary key |
//! instance id (16) | u32 len + sealed body | crc32 of all preceding bytes.
//! Body: generation u64 | current key id u64 (0 = none) | u32 count | per key: id u64,
//! method u8, created (unix seconds) u64, u32 len + key | (format 2) u8 mark present +
//! the file dictionary's mark: generation u64, last durable record u64, clean u8.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use super::{KeyError, MasterKeyBackend};
use crate::crypto::{random_bytes, random_u64, FileCipher, Iv, Method, SealKey, SealKeys, Secret};
use crate::codec::{check_header, write_header, Dec, DictMark, Enc, FileKind, HEADER_LEN};
use crate::error::IoError;

pub const KEYS_FILE: &str = "keys";
const BODY_AAD: &[u8] = b"tdefs key dictionary body v1";

/// One data key. `id` and key material travel together in one `Arc`, so a rotation can never
/// pair a file's recorded key id with another key.
pub struct DataKey {
    pub id: u64,
    pub method: Method,
    pub created: u64,
    key: Secret,
}

impl DataKey {
    pub fn cipher(&self, iv: &Iv) -> FileCipher {
        FileCipher::new(self.method, self.key.expose(), iv).expect("key length checked at load")
    }

    pub fn age(&self, now: SystemTime) -> Duration {
        let created = UNIX_EPOCH + Duration::from_secs(self.created);
        now.duration_since(created).unwrap_or_default()
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey({:#018x}, {}, created {})", self.id, self.method, self.created)
    }
}

#[derive(Clone, Default)]
struct State {
    generation: u64,
    current: u64,
    keys: BTreeMap<u64, Arc<DataKey>>,
    /// The file dictionary's mark (absent only in a format 1 key dictionary).
    mark: Option<DictMark>,
}

/// How the dictionary key is wrapped: master-key backend and blob. Changes on rotation.
struct Wrapping {
    kind: String,
    blob: Vec<u8>,
}

pub struct KeyStore {
    dir: Arc<crate::sys::Dir>,
    wrapping: Mutex<Wrapping>,
    /// The dictionary key itself, kept (locked in memory) so it can be re-wrapped.
    dict_key: Secret,
    seal: SealKey,
    seals: Arc<SealKeys>,
    instance: [u8; 16],
    /// Format version of the file as read (1: written by an older tdefs).
    format: u16,
    state: RwLock<State>,
    /// Serialises rewrites of the file (rotation), never held by readers.
    write_lock: Mutex<()>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyStore({}, {} keys)", self.path().display(), self.state.read().keys.len())
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl KeyStore {
    /// Create a new key dictionary in `dir` (which must not hold one), durably.
    pub fn create(dir: &Arc<crate::sys::Dir>, backend: &dyn MasterKeyBackend) -> Result<KeyStore, KeyError> {
        let (dict_key, wrapped) = backend.generate()?;
        // Prove the backend can open what it just wrapped before anything depends on it.
        if backend.unwrap(&wrapped)?.as_ref() != Some(&dict_key) {
            return Err(KeyError::WrongMasterKey { path: dir.join(KEYS_FILE), configured: backend.describe() });
        }
        let mut instance = [0u8; 16];
        random_bytes(&mut instance);
        // A new file dictionary is created at generation 1 with no records, closed.
        let state = State { mark: Some(DictMark { gen: 1, seq: 0, clean: true }), ..State::default() };
        let store = KeyStore {
            dir: dir.clone(),
            wrapping: Mutex::new(Wrapping { kind: backend.kind().to_string(), blob: wrapped }),
            seal: SealKey::new(&dict_key),
            seals: Arc::new(SealKeys::new(&dict_key, instance)),
            dict_key,
            instance,
            format: crate::codec::FORMAT_VERSION,
            state: RwLock::new(state.clone()),
            write_lock: Mutex::new(()),
        };
        store.persist(&state)?;
        Ok(store)
    }

    /// Open the key dictionary in `dir` with `backend`. Reads only.
    pub fn open(dir: &Arc<crate::sys::Dir>, backend: &dyn MasterKeyBackend) -> Result<KeyStore, KeyError> {
        let path = dir.join(KEYS_FILE);
        let bytes = dir.read(KEYS_FILE).map_err(|e| KeyError::from(IoError::new("read", path.clone(), e)))?;
        let corrupt = |reason: &str| KeyError::Corrupt { path: path.clone(), reason: reason.to_string() };
        let format = check_header(&bytes, FileKind::Keys).map_err(|err| KeyError::Header { path: path.clone(), err })?;
        if bytes.len() < HEADER_LEN + 4 {
            return Err(corrupt("truncated"));
        }
        let (content, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(content).to_le_bytes() != crc {
            return Err(corrupt("checksum mismatch (the file is truncated or bytes were changed)"));
        }
        let mut d = Dec::new(&content[HEADER_LEN..]);
        let kind_len = d.u8().ok_or_else(|| corrupt("truncated"))? as usize;
        let kind = d.raw(kind_len).ok_or_else(|| corrupt("truncated"))?;
        let kind = String::from_utf8_lossy(kind).into_owned();
        let wrapped = d.bytes(1 << 16).ok_or_else(|| corrupt("bad wrapped key"))?.to_vec();
        let instance: [u8; 16] = d.array().ok_or_else(|| corrupt("truncated"))?;
        let aad_end = HEADER_LEN + d.pos();
        let sealed = d.bytes(1 << 30).ok_or_else(|| corrupt("bad body length"))?;
        if !d.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        if kind != backend.kind() {
            return Err(KeyError::BackendMismatch { path, stored: kind, configured: backend.kind().into() });
        }
        let dict_key = backend
            .unwrap(&wrapped)?
            .ok_or_else(|| KeyError::WrongMasterKey { path: path.clone(), configured: backend.describe() })?;
        let seal = SealKey::new(&dict_key);
        let aad = [BODY_AAD, &content[..aad_end]].concat();
        let body = seal.open(&aad, sealed).map_err(|_| corrupt("body fails authentication"))?;
        let state = decode_body(body.expose(), format).ok_or_else(|| corrupt("body is malformed"))?;
        Ok(KeyStore {
            dir: dir.clone(),
            wrapping: Mutex::new(Wrapping { kind, blob: wrapped }),
            seals: Arc::new(SealKeys::new(&dict_key, instance)),
            dict_key,
            seal,
            instance,
            format,
            state: RwLock::new(state),
            write_lock: Mutex::new(()),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(KEYS_FILE)
    }

    /// Keys that seal the file dictionary (derived per generation from the dictionary key).
    pub fn seal_keys(&self) -> &Arc<SealKeys> {
        &self.seals
    }

    /// Format version of the key dictionary as it was read (1: upgrade due).
    pub fn format(&self) -> u16 {
        self.format
    }

    /// The file dictionary's mark as last stored (`None` in a format 1 key dictionary).
    pub fn dictionary_mark(&self) -> Option<DictMark> {
        self.state.read().mark
    }

    /// Store the file dictionary's mark, durably.
    pub fn set_dictionary_mark(&self, mark: DictMark) -> Result<(), KeyError> {
        let _w = self.write_lock.lock();
        let mut next = self.state.read().clone();
        next.mark = Some(mark);
        self.persist(&next)?;
        *self.state.write() = next;
        Ok(())
    }

    /// Random id of this tdefs instance; binds dictionary files to this key dictionary.
    pub fn instance(&self) -> [u8; 16] {
        self.instance
    }

    /// Type of the master key the dictionary key is wrapped with.
    pub fn backend_kind(&self) -> String {
        self.wrapping.lock().kind.clone()
    }

    /// Wrap the dictionary key under another master key and replace the key dictionary
    /// atomically and durably: a crash at any instant leaves it openable by the old or by
    /// the new master key. Nothing else is rewritten.
    pub fn rewrap(&self, backend: &dyn MasterKeyBackend) -> Result<(), KeyError> {
        let blob = backend.wrap(&self.dict_key)?;
        self.install(backend, blob)
    }

    /// Ask the master key's service whether the dictionary key has a newer wrapping (a key
    /// version rotated inside the service) and store it, as `rewrap` does.
    pub fn refresh(&self, backend: &dyn MasterKeyBackend) -> Result<(), KeyError> {
        let current = self.wrapping.lock().blob.clone();
        if let Some(blob) = backend.refresh(&current)? {
            self.install(backend, blob)?;
            tracing::warn!(
                master_key = %backend.describe(),
                "the master key has a newer version inside its service: the dictionary key is now wrapped by it"
            );
        }
        Ok(())
    }

    /// Store `blob` (the dictionary key wrapped by `backend`) once it is proven to open.
    fn install(&self, backend: &dyn MasterKeyBackend, blob: Vec<u8>) -> Result<(), KeyError> {
        if backend.unwrap(&blob)?.as_ref() != Some(&self.dict_key) {
            return Err(KeyError::WrongMasterKey { path: self.path(), configured: backend.describe() });
        }
        let _w = self.write_lock.lock();
        let st = self.state.read().clone();
        let old = std::mem::replace(&mut *self.wrapping.lock(), Wrapping { kind: backend.kind().to_string(), blob });
        if let Err(e) = self.persist(&st) {
            *self.wrapping.lock() = old;
            return Err(e);
        }
        Ok(())
    }

    /// Delete data keys `ids` (never the current one), durably. Returns how many went.
    pub fn remove_keys(&self, ids: &[u64]) -> Result<usize, KeyError> {
        let _w = self.write_lock.lock();
        let mut next = self.state.read().clone();
        let before = next.keys.len();
        for id in ids {
            if *id != next.current {
                next.keys.remove(id);
            }
        }
        let removed = before - next.keys.len();
        if removed > 0 {
            next.generation += 1;
            self.persist(&next)?;
            *self.state.write() = next;
        }
        Ok(removed)
    }

    pub fn get(&self, id: u64) -> Option<Arc<DataKey>> {
        self.state.read().keys.get(&id).cloned()
    }

    pub fn keys(&self) -> Vec<Arc<DataKey>> {
        self.state.read().keys.values().cloned().collect()
    }

    /// Raw key material of data key `id` (for `tdefs dump keys --show-secrets` only).
    pub fn expose_key(&self, id: u64) -> Option<Vec<u8>> {
        self.get(id).map(|k| k.key.expose().to_vec())
    }

    pub fn current(&self) -> Option<Arc<DataKey>> {
        let st = self.state.read();
        st.keys.get(&st.current).cloned()
    }

    /// The key for a new file under `method`: the current key if it has that method and is
    /// younger than `period`, else a new one, which becomes current (made durable before it
    /// is returned). `None` for plaintext.
    pub fn key_for_new_file(&self, method: Method, period: Duration) -> Result<Option<Arc<DataKey>>, KeyError> {
        self.fresh_key(method, period, true)
    }

    /// The key an online conversion to `method` re-encrypts a file under: the current key
    /// if it has that method and is younger than `period`, else the newest such key, else a
    /// new one, which does *not* become current (new files keep the configured method). A
    /// caller holds the mount's `key_use` guard until the key is referenced, so key GC
    /// cannot take it meanwhile. `None` for plaintext.
    pub fn key_for_conversion(&self, method: Method, period: Duration) -> Result<Option<Arc<DataKey>>, KeyError> {
        self.fresh_key(method, period, false)
    }

    fn fresh_key(&self, method: Method, period: Duration, make_current: bool) -> Result<Option<Arc<DataKey>>, KeyError> {
        if method.is_plaintext() {
            return Ok(None);
        }
        let fresh = |st: &State| {
            let ok = |k: &&Arc<DataKey>| k.method == method && k.age(SystemTime::now()) < period;
            let current = st.keys.get(&st.current).filter(ok).cloned();
            if make_current {
                return current;
            }
            current.or_else(|| st.keys.values().filter(ok).max_by_key(|k| k.created).cloned())
        };
        if let Some(k) = fresh(&self.state.read()) {
            return Ok(Some(k));
        }
        let _w = self.write_lock.lock();
        if let Some(k) = fresh(&self.state.read()) {
            return Ok(Some(k));
        }
        let mut next = self.state.read().clone();
        let id = loop {
            // Random 64-bit ids can collide (TiKV lost data that way): check.
            let id = random_u64();
            if id != 0 && !next.keys.contains_key(&id) {
                break id;
            }
        };
        let key = Arc::new(DataKey { id, method, created: now_secs(), key: new_key_material(method) });
        next.keys.insert(id, key.clone());
        if make_current {
            next.current = id;
        }
        next.generation += 1;
        self.persist(&next)?;
        *self.state.write() = next;
        tracing::info!(key_id = format_args!("{id:#018x}"), %method, current = make_current, "new data key");
        crate::metrics::data_key_rotated();
        Ok(Some(key))
    }

    fn persist(&self, st: &State) -> Result<(), KeyError> {
        let mut out = Vec::with_capacity(256);
        write_header(&mut out, FileKind::Keys);
        let mut e = Enc(out);
        {
            let w = self.wrapping.lock();
            e.u8(w.kind.len() as u8).raw(w.kind.as_bytes());
            e.bytes(&w.blob).raw(&self.instance);
        }
        let aad = [BODY_AAD, &e.0].concat();
        let body = encode_body(st);
        let sealed = self.seal.seal(&aad, body.expose());
        e.bytes(&sealed);
        let crc = crc32fast::hash(&e.0);
        e.raw(&crc.to_le_bytes());
        self.dir.write_durably(KEYS_FILE, &e.0)
            .map_err(|err| KeyError::from(IoError::new("write", self.path(), err)))
    }
}

/// Fresh key material for `method`. An XTS key is a pair K1||K2 that must differ (IEEE
/// 1619, NIST SP 800-38E): equal halves are drawn again (a chance of 2^-128, but checked).
fn new_key_material(method: Method) -> Secret {
    loop {
        let k = Secret::random(method.key_len());
        let (a, b) = k.expose().split_at(k.len() / 2);
        if !method.is_xts() || a != b {
            return k;
        }
    }
}

fn encode_body(st: &State) -> Secret {
    // Sized exactly up front: a growing Vec would leave copies of key material behind in
    // the buffers it outgrows, freed without being zeroized.
    let len = 8 + 8 + 4 + st.keys.values().map(|k| 8 + 1 + 8 + 4 + k.key.len()).sum::<usize>() + 1 + 17;
    let mut e = Enc(Vec::with_capacity(len));
    e.u64(st.generation).u64(st.current).u32(st.keys.len() as u32);
    for k in st.keys.values() {
        e.u64(k.id).u8(k.method.code()).u64(k.created).bytes(k.key.expose());
    }
    match st.mark {
        Some(m) => e.u8(1).u64(m.gen).u64(m.seq).u8(m.clean as u8),
        None => e.u8(0),
    };
    debug_assert!(e.0.len() <= len && e.0.capacity() == len, "no reallocation");
    Secret::new(e.0)
}

fn decode_body(b: &[u8], format: u16) -> Option<State> {
    let mut d = Dec::new(b);
    let generation = d.u64()?;
    let current = d.u64()?;
    let n = d.u32()?;
    let mut keys = BTreeMap::new();
    for _ in 0..n {
        let id = d.u64()?;
        let method = Method::from_code(d.u8()?)?;
        let created = d.u64()?;
        let key = d.bytes(64)?;
        if key.len() != method.key_len() || method.is_plaintext() || id == 0 {
            return None;
        }
        keys.insert(id, Arc::new(DataKey { id, method, created, key: Secret::new(key.to_vec()) }));
    }
    let mark = if format >= 2 {
        match d.u8()? {
            0 => None,
            1 => Some(DictMark {
                gen: d.u64()?,
                seq: d.u64()?,
                clean: match d.u8()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                },
            }),
            _ => return None,
        }
    } else {
        None
    };
    if !d.is_empty() || (current != 0 && !keys.contains_key(&current)) {
        return None;
    }
    Some(State { generation, current, keys, mark })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{generate_key_file, FileBackend, PlaintextBackend};

    fn meta_dir(d: &tempfile::TempDir) -> Arc<crate::sys::Dir> {
        let parent = std::fs::File::open(d.path().parent().unwrap()).unwrap();
        Arc::new(crate::sys::Dir::open_verified(std::os::fd::AsFd::as_fd(&parent), d.path().file_name().unwrap(), d.path()).unwrap())
    }

    fn backend(dir: &std::path::Path, name: &str) -> FileBackend {
        let p = dir.join(name);
        generate_key_file(&p).unwrap();
        FileBackend::load(&p).unwrap()
    }

    #[test]
    fn create_rotate_reopen() {
        let d = tempfile::tempdir().unwrap();
        let b = backend(d.path(), "mk");
        let s = KeyStore::create(&meta_dir(&d), &b).unwrap();
        let day = Duration::from_secs(86400);
        let k1 = s.key_for_new_file(Method::Aes256Ctr, day).unwrap().unwrap();
        assert_eq!(s.key_for_new_file(Method::Aes256Ctr, day).unwrap().unwrap().id, k1.id, "reused while young");
        let k2 = s.key_for_new_file(Method::Sm4Ctr, day).unwrap().unwrap();
        assert_ne!(k1.id, k2.id, "method change makes a new key");
        assert!(s.key_for_new_file(Method::Plaintext, day).unwrap().is_none());
        let k3 = s.key_for_new_file(Method::Sm4Ctr, Duration::ZERO).unwrap().unwrap();
        assert_ne!(k2.id, k3.id, "expired key rotates");

        let r = KeyStore::open(&meta_dir(&d), &b).unwrap();
        assert_eq!(r.instance(), s.instance());
        assert_eq!(r.keys().len(), 3);
        assert_eq!(r.current().unwrap().id, k3.id);
        let iv = [7u8; 16];
        let mut a = *b"some plaintext!!";
        let mut c = a;
        k1.cipher(&iv).apply(5, &mut a);
        r.get(k1.id).unwrap().cipher(&iv).apply(5, &mut c);
        assert_eq!(a, c, "same key material after reopen");
    }

    #[test]
    fn wrong_key_mismatch_and_corruption_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let b = backend(d.path(), "mk");
        let s = KeyStore::create(&meta_dir(&d), &b).unwrap();
        s.key_for_new_file(Method::Aes128Ctr, Duration::from_secs(60)).unwrap();
        let path = s.path();
        let orig = std::fs::read(&path).unwrap();

        let other = backend(d.path(), "other");
        assert!(matches!(KeyStore::open(&meta_dir(&d), &other), Err(KeyError::WrongMasterKey { .. })));
        let e = KeyStore::open(&meta_dir(&d), &PlaintextBackend).unwrap_err();
        assert!(matches!(e, KeyError::BackendMismatch { .. }), "{e}");

        for i in 0..orig.len() {
            let mut t = orig.clone();
            t[i] ^= 0x40;
            std::fs::write(&path, &t).unwrap();
            assert!(KeyStore::open(&meta_dir(&d), &b).is_err(), "flip at byte {i} accepted");
        }
        for len in [0, 5, HEADER_LEN, orig.len() / 2, orig.len() - 1] {
            std::fs::write(&path, &orig[..len]).unwrap();
            let e = KeyStore::open(&meta_dir(&d), &b).unwrap_err().to_string();
            assert!(e.contains(&*path.to_string_lossy()), "{e}");
        }
        std::fs::write(&path, &orig).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), orig);
        KeyStore::open(&meta_dir(&d), &b).unwrap();
    }
}
