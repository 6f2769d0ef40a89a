//! The key-value backend under the [ledger](super::ledger): an ordered map of byte
//! keys to byte values with atomic batch writes. Everything ferry-specific (what the
//! keys mean, sequences, cursors, bounds, record encoding) lives in the ledger, so a
//! backend is small and every backend is checked against the same model test.

use super::StoreError;

/// One change in a [`Batch`].
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Every key `k` with `from <= k < to`.
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// Changes applied all at once or not at all.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batch {
    pub ops: Vec<Op>,
    /// On stable storage (fsync/fdatasync, drive cache included) when
    /// [`Backend::commit`] returns. A batch that is not durable may be lost at a
    /// crash, whole (never in part), and is made durable by the next durable one.
    pub durable: bool,
}

impl Batch {
    pub fn durable() -> Self {
        Batch {
            ops: Vec::new(),
            durable: true,
        }
    }

    pub fn lazy() -> Self {
        Batch::default()
    }

    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(key.into(), value.into()));
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(key.into()));
    }

    pub fn delete_range(&mut self, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.ops.push(Op::DeleteRange(from.into(), to.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// What the ledger needs from storage. Calls block: the ledger is called from
/// `spawn_blocking` or a blocking-tolerant context.
pub trait Backend: Send + Sync + 'static {
    /// `sled` or `redb`, for logs.
    fn name(&self) -> &'static str;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Calls `visit` with every entry whose key is in `from..to`, in key order,
    /// until it returns `false`.
    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError>;
    /// Applies the batch atomically; see [`Batch::durable`].
    fn commit(&self, batch: Batch) -> Result<(), StoreError>;
    /// The bytes its files take on disk.
    fn size_on_disk(&self) -> Result<u64, StoreError>;
    /// Gives disk space back after a large backlog drained. Called rarely (the
    /// ledger decides when), with no records stored.
    fn reclaim(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The key just past every key that starts with `prefix`, for a prefix scan. The
/// ledger's prefixes are ASCII, so the last byte can always go up by one.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last = last.saturating_add(1);
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(prefix_end(b"c:"), b"c;".to_vec());
    }
}
