//! A reader for PyTorch's zip checkpoint format (`torch.save` since 1.6), for state_dicts.
//!
//! burn's PyTorch reader goes through the `zip` crate, whose central-directory detection
//! misreads some valid archives (seen with `mobilenet_v2-imagenet.pth`: the ZIP64 end records
//! are exactly as long as the first directory entry, so the entry after it is taken for the
//! directory start). PyTorch's archives are simple (stored entries, one pickle, one file per
//! storage), so this module reads them directly: the zip directory, then `data.pkl` with a
//! small pickle machine that understands what a state_dict contains. Other formats (legacy
//! pickle, tar) still go through burn's reader.

use std::collections::{BTreeMap, HashMap};

use super::weights::StoredTensor;

/// The element types a storage can have, from its pickled class name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StorageType {
    F32,
    F64,
    F16,
    BF16,
    /// Integer and boolean storages: not weights, skipped.
    Other,
}

impl StorageType {
    fn from_class(name: &str) -> Self {
        match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            _ => Self::Other,
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F64 => 8,
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Other => 1,
        }
    }

    fn read(self, bytes: &[u8]) -> f32 {
        match self {
            Self::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            Self::F64 => {
                let mut array = [0u8; 8];
                array.copy_from_slice(&bytes[..8]);
                f64::from_le_bytes(array) as f32
            }
            Self::F16 => half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
            Self::BF16 => half::bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
            Self::Other => 0.0,
        }
    }
}

/// Little-endian elements of `kind` as f32, for every reader of PyTorch tensors.
pub(super) fn decode_floats(kind: StorageType, bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(kind.size())
        .map(|element| kind.read(element))
        .collect()
}

/// A value on the pickle machine's stack.
#[derive(Debug, Clone)]
enum Value {
    Mark,
    None,
    /// Booleans and floats: present (e.g. `requires_grad`) but never needed.
    Scalar,
    Int(i64),
    Text(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage {
        key: String,
        kind: StorageType,
    },
    Tensor(TensorRef),
}

/// A tensor as the pickle describes it: a view into a storage.
#[derive(Debug, Clone)]
struct TensorRef {
    storage: String,
    kind: StorageType,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

fn u16_at(bytes: &[u8], at: usize) -> Result<u16, String> {
    bytes
        .get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| "the file ends early (truncated)".to_owned())
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, String> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| "the file ends early (truncated)".to_owned())
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64, String> {
    bytes
        .get(at..at + 8)
        .map(|b| {
            let mut array = [0u8; 8];
            array.copy_from_slice(b);
            u64::from_le_bytes(array)
        })
        .ok_or_else(|| "the file ends early (truncated)".to_owned())
}

/// The stored entries of a zip archive: name -> byte range of the data.
fn zip_entries(bytes: &[u8]) -> Result<HashMap<String, std::ops::Range<usize>>, String> {
    const END_SIGNATURE: &[u8] = b"PK\x05\x06";
    let search_from = bytes.len().saturating_sub(22 + 65535);
    let end = bytes[search_from..]
        .windows(4)
        .rposition(|window| window == END_SIGNATURE)
        .map(|position| search_from + position)
        .ok_or("no zip end record: the file is truncated or not a zip archive")?;
    let mut entries = u64::from(u16_at(bytes, end + 10)?);
    let mut directory = u64::from(u32_at(bytes, end + 16)?);
    if entries == 0xFFFF || directory == 0xFFFF_FFFF {
        // ZIP64: the locator just before the end record points at the ZIP64 end record.
        let locator = end.checked_sub(20).ok_or("bad ZIP64 locator")?;
        if bytes.get(locator..locator + 4) != Some(b"PK\x06\x07") {
            return Err("missing ZIP64 locator".into());
        }
        let record = usize::try_from(u64_at(bytes, locator + 8)?).map_err(|e| e.to_string())?;
        if bytes.get(record..record + 4) != Some(b"PK\x06\x06") {
            return Err("missing ZIP64 end record".into());
        }
        entries = u64_at(bytes, record + 32)?;
        directory = u64_at(bytes, record + 48)?;
    }
    let mut at = usize::try_from(directory).map_err(|e| e.to_string())?;
    let mut found = HashMap::new();
    for _ in 0..entries {
        if bytes.get(at..at + 4) != Some(b"PK\x01\x02") {
            return Err(format!("bad zip directory entry at byte {at}"));
        }
        let method = u16_at(bytes, at + 10)?;
        let mut size = u64::from(u32_at(bytes, at + 20)?);
        let name_length = usize::from(u16_at(bytes, at + 28)?);
        let extra_length = usize::from(u16_at(bytes, at + 30)?);
        let comment_length = usize::from(u16_at(bytes, at + 32)?);
        let mut local = u64::from(u32_at(bytes, at + 42)?);
        let name_bytes = bytes
            .get(at + 46..at + 46 + name_length)
            .ok_or("the file ends early (truncated)")?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let extra = bytes
            .get(at + 46 + name_length..at + 46 + name_length + extra_length)
            .ok_or("the file ends early (truncated)")?;
        apply_zip64_extra(extra, &mut size, &mut local)?;
        if method != 0 {
            return Err(format!(
                "entry '{name}' is compressed; PyTorch writes stored entries"
            ));
        }
        let local = usize::try_from(local).map_err(|e| e.to_string())?;
        if bytes.get(local..local + 4) != Some(b"PK\x03\x04") {
            return Err(format!("bad local header of '{name}'"));
        }
        let data_start = local
            + 30
            + usize::from(u16_at(bytes, local + 26)?)
            + usize::from(u16_at(bytes, local + 28)?);
        let data_end = data_start + usize::try_from(size).map_err(|e| e.to_string())?;
        if data_end > bytes.len() {
            return Err(format!(
                "entry '{name}' ends past the end of the file (truncated)"
            ));
        }
        found.insert(name, data_start..data_end);
        at += 46 + name_length + extra_length + comment_length;
    }
    Ok(found)
}

/// Reads the ZIP64 extended-information extra field: the 64-bit values of fields that are
/// 0xFFFFFFFF in the directory entry, in the order uncompressed size, compressed size, offset.
fn apply_zip64_extra(extra: &[u8], size: &mut u64, local: &mut u64) -> Result<(), String> {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let id = u16_at(extra, at)?;
        let length = usize::from(u16_at(extra, at + 2)?);
        if id == 1 {
            let mut field = at + 4;
            if *size == 0xFFFF_FFFF {
                *size = u64_at(extra, field)?;
                field += 8;
                // The compressed size follows; stored entries have the same value.
                field += 8;
            }
            if *local == 0xFFFF_FFFF {
                *local = u64_at(extra, field)?;
            }
        }
        at += 4 + length;
    }
    Ok(())
}

/// Reads every float tensor of a PyTorch zip checkpoint holding a state_dict.
pub fn read_zip_state_dict(bytes: &[u8]) -> Result<BTreeMap<String, StoredTensor>, String> {
    let entries = zip_entries(bytes)?;
    let (pickle_name, pickle_range) = entries
        .iter()
        .filter(|(name, _)| name.ends_with("data.pkl"))
        .min_by_key(|(name, _)| name.len())
        .ok_or("no data.pkl in the archive: not a PyTorch checkpoint")?;
    let root = pickle_name.trim_end_matches("data.pkl").to_owned();
    let value = Unpickler::new(&bytes[pickle_range.clone()]).run()?;
    let items = match value {
        Value::Dict(items) => items,
        _ => return Err("data.pkl does not hold a dict (state_dict)".into()),
    };
    let mut tensors = BTreeMap::new();
    for (key, value) in items {
        let (Value::Text(key), Value::Tensor(tensor)) = (key, value) else {
            continue;
        };
        if tensor.kind == StorageType::Other {
            continue;
        }
        let range = entries
            .get(&format!("{root}data/{}", tensor.storage))
            .ok_or_else(|| format!("tensor '{key}': its storage {} is missing", tensor.storage))?;
        let storage = &bytes[range.clone()];
        let values =
            gather(&tensor, storage).map_err(|error| format!("tensor '{key}': {error}"))?;
        tensors.insert(
            key,
            StoredTensor {
                shape: tensor.size.clone(),
                values,
            },
        );
    }
    Ok(tensors)
}

/// The tensor's elements in row-major order, following its strides into the storage.
fn gather(tensor: &TensorRef, storage: &[u8]) -> Result<Vec<f32>, String> {
    let element = tensor.kind.size();
    let count: usize = tensor.size.iter().product();
    let mut values = Vec::with_capacity(count);
    let mut index = vec![0usize; tensor.size.len()];
    for _ in 0..count {
        let position = tensor.offset
            + index
                .iter()
                .zip(&tensor.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        let bytes = storage
            .get(position * element..(position + 1) * element)
            .ok_or("its data lies past the end of its storage")?;
        values.push(tensor.kind.read(bytes));
        for dim in (0..index.len()).rev() {
            index[dim] += 1;
            if index[dim] < tensor.size[dim] {
                break;
            }
            index[dim] = 0;
        }
    }
    Ok(values)
}

/// A pickle machine for the opcodes `torch.save` emits for state_dicts.
struct Unpickler<'a> {
    bytes: &'a [u8],
    at: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            at: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        let slice = self
            .bytes
            .get(self.at..self.at + count)
            .ok_or("data.pkl ends early (truncated)")?;
        self.at += count;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.bytes[self.at..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("data.pkl ends early (truncated)")?;
        self.at += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_owned())
    }

    fn pop_to_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|value| matches!(value, Value::Mark))
            .ok_or("pickle MARK missing")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top_mut(&mut self) -> Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow".to_owned())
    }

    fn text(&mut self, length: usize) -> Result<Value, String> {
        Ok(Value::Text(
            String::from_utf8_lossy(self.take(length)?).into_owned(),
        ))
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let opcode = self.byte()?;
            match opcode {
                0x80 => {
                    self.byte()?; // PROTO n
                }
                0x95 => {
                    self.take(8)?; // FRAME length
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Scalar),
                b'J' => {
                    let b = self.take(4)?;
                    self.stack.push(Value::Int(i64::from(i32::from_le_bytes([
                        b[0], b[1], b[2], b[3],
                    ]))));
                }
                b'K' => {
                    let value = self.byte()?;
                    self.stack.push(Value::Int(i64::from(value)));
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack
                        .push(Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))));
                }
                0x8a => {
                    let length = usize::from(self.byte()?);
                    let b = self.take(length)?;
                    let mut value: i64 = 0;
                    for (i, byte) in b.iter().enumerate().take(8) {
                        value |= i64::from(*byte) << (8 * i);
                    }
                    if length > 0 && length < 8 && b[length - 1] & 0x80 != 0 {
                        value -= 1i64 << (8 * length);
                    }
                    self.stack.push(Value::Int(value));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Scalar);
                }
                b'X' | b'T' => {
                    let length = u32_at(self.bytes, self.at)? as usize;
                    self.at += 4;
                    let value = self.text(length)?;
                    self.stack.push(value);
                }
                0x8c | b'U' => {
                    let length = usize::from(self.byte()?);
                    let value = self.text(length)?;
                    self.stack.push(value);
                }
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_to_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let count = usize::from(opcode - 0x84);
                    let at = self
                        .stack
                        .len()
                        .checked_sub(count)
                        .ok_or("pickle stack underflow")?;
                    let items = self.stack.split_off(at);
                    self.stack.push(Value::Tuple(items));
                }
                b']' => self.stack.push(Value::List(Vec::new())),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b'a' => {
                    let item = self.pop()?;
                    if let Value::List(list) = self.top_mut()? {
                        list.push(item);
                    }
                }
                b'e' => {
                    let items = self.pop_to_mark()?;
                    if let Value::List(list) = self.top_mut()? {
                        list.extend(items);
                    }
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    if let Value::Dict(dict) = self.top_mut()? {
                        dict.push((key, value));
                    }
                }
                b'u' => {
                    let items = self.pop_to_mark()?;
                    if let Value::Dict(dict) = self.top_mut()? {
                        let mut pairs = items.into_iter();
                        while let (Some(key), Some(value)) = (pairs.next(), pairs.next()) {
                            dict.push((key, value));
                        }
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    if let (Value::Text(module), Value::Text(name)) = (module, name) {
                        self.stack.push(Value::Global(module, name));
                    } else {
                        return Err("STACK_GLOBAL without names".into());
                    }
                }
                b'q' => {
                    let index = u32::from(self.byte()?);
                    self.memoize(index)?;
                }
                b'r' => {
                    let index = u32_at(self.bytes, self.at)?;
                    self.at += 4;
                    self.memoize(index)?;
                }
                0x94 => {
                    let index = self.memo.len() as u32;
                    self.memoize(index)?;
                }
                b'h' => {
                    let index = u32::from(self.byte()?);
                    self.recall(index)?;
                }
                b'j' => {
                    let index = u32_at(self.bytes, self.at)?;
                    self.at += 4;
                    self.recall(index)?;
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.stack.push(persistent_storage(id)?);
                }
                b'R' => {
                    let arguments = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(reduce(callable, arguments)?);
                }
                b'b' => {
                    // State for an object (e.g. the state_dict's `_metadata`): not needed.
                    self.pop()?;
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {} of data.pkl",
                        self.at - 1
                    ));
                }
            }
        }
    }

    fn memoize(&mut self, index: u32) -> Result<(), String> {
        let top = self.stack.last().ok_or("pickle stack underflow")?.clone();
        self.memo.insert(index, top);
        Ok(())
    }

    fn recall(&mut self, index: u32) -> Result<(), String> {
        let value = self
            .memo
            .get(&index)
            .ok_or_else(|| format!("pickle memo {index} missing"))?
            .clone();
        self.stack.push(value);
        Ok(())
    }
}

/// `('storage', torch.FloatStorage, key, location, numel)` -> a storage reference.
fn persistent_storage(id: Value) -> Result<Value, String> {
    let Value::Tuple(parts) = id else {
        return Err("unexpected persistent id".into());
    };
    match parts.as_slice() {
        [
            Value::Text(tag),
            Value::Global(_, class),
            Value::Text(key),
            ..,
        ] if tag == "storage" => Ok(Value::Storage {
            key: key.clone(),
            kind: StorageType::from_class(class),
        }),
        _ => Err("unexpected persistent id".into()),
    }
}

fn int_list(value: &Value) -> Result<Vec<usize>, String> {
    match value {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|item| match item {
                Value::Int(n) => usize::try_from(*n).map_err(|e| e.to_string()),
                _ => Err("a tensor size or stride is not an integer".to_owned()),
            })
            .collect(),
        _ => Err("a tensor size or stride is not a tuple".into()),
    }
}

/// Calls the globals a state_dict uses: OrderedDict() and `_rebuild_tensor_v2`.
fn reduce(callable: Value, arguments: Value) -> Result<Value, String> {
    let Value::Global(module, name) = callable else {
        return Err("REDUCE on a non-global".into());
    };
    let Value::Tuple(arguments) = arguments else {
        return Err("REDUCE without an argument tuple".into());
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
            let [
                Value::Storage { key, kind },
                Value::Int(offset),
                size,
                stride,
                ..,
            ] = arguments.as_slice()
            else {
                return Err("unexpected arguments to _rebuild_tensor_v2".into());
            };
            Ok(Value::Tensor(TensorRef {
                storage: key.clone(),
                kind: *kind,
                offset: usize::try_from(*offset).map_err(|e| e.to_string())?,
                size: int_list(size)?,
                stride: int_list(stride)?,
            }))
        }
        ("torch._utils", "_rebuild_parameter") => arguments
            .into_iter()
            .next()
            .ok_or_else(|| "empty _rebuild_parameter".to_owned()),
        // Anything else (e.g. extra metadata objects) is kept as an opaque value.
        _ => Ok(Value::None),
    }
}
