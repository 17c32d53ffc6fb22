//! One decoding session on onnxruntime: the KV cache lives in two buffers per layer allocated
//! when the session is created and bound through an `OrtIoBinding` as `past_key_values.*`
//! (read) and `present.*` (written), swapping roles each step, so a step allocates nothing on
//! kiln's side and copies no cache.

use std::ffi::{c_void, CString};
use std::ptr::{self, NonNull};

use ::ort::sys::{
    ONNXTensorElementDataType, OrtAllocatorType, OrtIoBinding, OrtMemType, OrtMemoryInfo, OrtValue,
};
use ::ort::AsPointer;

use super::library::status_ok;
use super::{OrtError, OrtModel};
use crate::decoder::Decoder;
use kiln_runtime::exec::{check_tokens, SessionError, SessionOptions, DEFAULT_CONTEXT};
use kiln_runtime::model::ModelFacts;

/// Checks that `session` has the interface `cargo xtask export` writes for `facts`.
pub fn check_interface(
    session: &::ort::session::Session,
    facts: &ModelFacts,
) -> Result<(), String> {
    let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
    let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    let names = Names::new(facts.layers).map_err(|e| e.to_string())?;
    for (i, want) in names.past.iter().enumerate() {
        let want = want.to_string_lossy();
        if !inputs.contains(&want.as_ref()) {
            return Err(format!(
                "input `{want}` is missing: the model has {} layer(s) of KV cache inputs, its facts say {} (inputs: {})",
                i / 2,
                facts.layers,
                inputs.join(", ")
            ));
        }
    }
    for want in ["input_ids", "attention_mask", "position_ids"] {
        if !inputs.contains(&want) {
            return Err(format!(
                "input `{want}` is missing (inputs: {})",
                inputs.join(", ")
            ));
        }
    }
    for want in names.present.iter().map(|n| n.to_string_lossy()) {
        if !outputs.contains(&want.as_ref()) {
            return Err(format!(
                "output `{want}` is missing (outputs: {})",
                outputs.join(", ")
            ));
        }
    }
    if !outputs.contains(&"logits") {
        return Err(format!(
            "output `logits` is missing (outputs: {})",
            outputs.join(", ")
        ));
    }
    Ok(())
}

/// Input and output names, made once.
struct Names {
    input_ids: CString,
    attention_mask: CString,
    position_ids: CString,
    logits: CString,
    /// `past_key_values.{l}.key`, `…value`, per layer.
    past: Vec<CString>,
    /// `present.{l}.key`, `…value`, per layer.
    present: Vec<CString>,
}

impl Names {
    fn new(layers: usize) -> Result<Names, std::ffi::NulError> {
        let per_layer = |prefix: &str| -> Result<Vec<CString>, std::ffi::NulError> {
            (0..layers)
                .flat_map(|l| ["key", "value"].map(|kind| format!("{prefix}.{l}.{kind}")))
                .map(CString::new)
                .collect()
        };
        Ok(Names {
            input_ids: CString::new("input_ids")?,
            attention_mask: CString::new("attention_mask")?,
            position_ids: CString::new("position_ids")?,
            logits: CString::new("logits")?,
            past: per_layer("past_key_values")?,
            present: per_layer("present")?,
        })
    }
}

/// A decoder over an [`OrtModel`] with its own KV cache.
pub struct OrtSession<'m> {
    model: &'m OrtModel,
    binding: NonNull<OrtIoBinding>,
    memory: NonNull<OrtMemoryInfo>,
    names: Names,
    /// Two caches; `kv[current]` holds the `pos` cached tokens, the other receives the next
    /// step's `present`. Each is `2 × layers` slots of `kv_heads × context × head_dim` floats.
    kv: [Vec<f32>; 2],
    current: usize,
    slot: usize,
    ids: Vec<i64>,
    positions: Vec<i64>,
    /// All ones, `context` long: every cached token is attended to.
    mask: Vec<i64>,
    logits: Vec<f32>,
    /// Values created for one step, released after it.
    step_values: Vec<*mut OrtValue>,
    pos: usize,
    context: usize,
    batch: usize,
    logits_all: bool,
}

impl<'m> OrtSession<'m> {
    pub(super) fn new(model: &'m OrtModel, opts: &SessionOptions) -> Result<Self, OrtError> {
        let f = &model.facts;
        let context = match opts.context {
            0 => f.context_length.min(DEFAULT_CONTEXT),
            c => c,
        };
        if context > f.context_length {
            return Err(OrtError::Model {
                path: model.path().to_path_buf(),
                why: format!(
                    "a context of {context} exceeds the model's {} tokens",
                    f.context_length
                ),
            });
        }
        let batch = opts.batch.max(1);
        let slot = f.kv_heads * context * f.head_dim;
        let names = Names::new(f.layers).map_err(|e| OrtError::Run(e.to_string()))?;
        let api = ::ort::api();
        let mut memory = ptr::null_mut();
        // SAFETY: the out-pointer is valid; onnxruntime returns a new memory info we release on drop.
        status_ok(unsafe {
            (api.CreateCpuMemoryInfo)(
                OrtAllocatorType::OrtDeviceAllocator,
                OrtMemType::OrtMemTypeDefault,
                &mut memory,
            )
        })?;
        let memory = NonNull::new(memory).ok_or_else(|| OrtError::Run("no memory info".into()))?;
        let mut binding = ptr::null_mut();
        // SAFETY: the session pointer is live for `'m`; the binding is released on drop, before it.
        let created = status_ok(unsafe {
            (api.CreateIoBinding)(model.session.ptr().cast_mut(), &mut binding)
        });
        let binding = match (created, NonNull::new(binding)) {
            (Ok(()), Some(b)) => b,
            (result, _) => {
                // SAFETY: created above and not shared.
                unsafe { (api.ReleaseMemoryInfo)(memory.as_ptr()) };
                result?;
                return Err(OrtError::Run("no IoBinding".into()));
            }
        };
        let values = 3 + 1 + 4 * f.layers;
        Ok(OrtSession {
            model,
            binding,
            memory,
            names,
            kv: [
                vec![0.0; 2 * f.layers * slot],
                vec![0.0; 2 * f.layers * slot],
            ],
            current: 0,
            slot,
            ids: vec![0; batch],
            positions: vec![0; batch],
            mask: vec![1; context],
            logits: vec![0.0; batch * f.vocab_size],
            step_values: Vec::with_capacity(values),
            pos: 0,
            context,
            batch,
            logits_all: opts.logits_all,
        })
    }

    fn check(&self, tokens: &[u32]) -> Result<(), SessionError> {
        check_tokens(tokens, self.pos, self.context, self.model.facts.vocab_size)
    }

    /// Runs at most `batch` tokens; their logits land in `self.logits`.
    fn step(&mut self, tokens: &[u32]) -> Result<(), SessionError> {
        let result = self.bind_and_run(tokens);
        let api = ::ort::api();
        for value in self.step_values.drain(..) {
            // SAFETY: each value was created by this step and is released exactly once; the
            // binding keeps its own reference until it is cleared.
            unsafe { (api.ReleaseValue)(value) };
        }
        result.map_err(|e| SessionError::Backend(e.to_string()))?;
        self.pos += tokens.len();
        self.current ^= 1;
        Ok(())
    }

    fn bind_and_run(&mut self, tokens: &[u32]) -> Result<(), OrtError> {
        let f = &self.model.facts;
        let (s, p) = (tokens.len(), self.pos);
        let t = p + s;
        for (i, &id) in tokens.iter().enumerate() {
            self.ids[i] = i64::from(id);
            self.positions[i] = (p + i) as i64;
        }
        let api = ::ort::api();
        let binding = self.binding.as_ptr();
        // SAFETY: the binding is live; clearing drops its references to last step's values.
        unsafe {
            (api.ClearBoundInputs)(binding);
            (api.ClearBoundOutputs)(binding);
        }
        let (kh, hd) = (f.kv_heads as i64, f.head_dim as i64);
        let ids = self.ids.as_mut_ptr().cast::<c_void>();
        let positions = self.positions.as_mut_ptr().cast::<c_void>();
        let mask = self.mask.as_mut_ptr().cast::<c_void>();
        let logits = self.logits.as_mut_ptr().cast::<c_void>();
        let int64 = ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
        let float = ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
        let (s64, t64) = (s as i64, t as i64);
        self.bind(true, 0, ids, s * 8, &[1, s64], int64)?;
        self.bind(true, 1, mask, t * 8, &[1, t64], int64)?;
        self.bind(true, 2, positions, s * 8, &[1, s64], int64)?;
        let vocab = f.vocab_size;
        self.bind(
            false,
            3,
            logits,
            s * vocab * 4,
            &[1, s64, vocab as i64],
            float,
        )?;
        let (read, write) = (self.current, self.current ^ 1);
        for i in 0..2 * f.layers {
            let offset = i * self.slot;
            let past = self.kv[read][offset..].as_mut_ptr().cast::<c_void>();
            let present = self.kv[write][offset..].as_mut_ptr().cast::<c_void>();
            let past_len = f.kv_heads * p * f.head_dim * 4;
            let present_len = f.kv_heads * t * f.head_dim * 4;
            self.bind(true, 4 + i, past, past_len, &[1, kh, p as i64, hd], float)?;
            self.bind(
                false,
                4 + 2 * f.layers + i,
                present,
                present_len,
                &[1, kh, t64, hd],
                float,
            )?;
        }
        // SAFETY: the session outlives `self`; every bound value points into buffers of `self`
        // that are neither moved nor resized while the run lasts.
        status_ok(unsafe {
            (api.RunWithBinding)(self.model.session.ptr().cast_mut(), ptr::null(), binding)
        })
    }

    /// Wraps `len` bytes at `data` as a tensor of `shape` and binds it as input or output `which`
    /// (0 ids, 1 mask, 2 positions, 3 logits, then past and present per layer and kind).
    fn bind(
        &mut self,
        input: bool,
        which: usize,
        data: *mut c_void,
        len: usize,
        shape: &[i64],
        dtype: ONNXTensorElementDataType,
    ) -> Result<(), OrtError> {
        let api = ::ort::api();
        let layers2 = 2 * self.model.facts.layers;
        let name = match which {
            0 => &self.names.input_ids,
            1 => &self.names.attention_mask,
            2 => &self.names.position_ids,
            3 => &self.names.logits,
            i if i < 4 + layers2 => &self.names.past[i - 4],
            i => &self.names.present[i - 4 - layers2],
        };
        let mut value = ptr::null_mut();
        // SAFETY: `data` points to at least `len` bytes of `dtype` elements owned by `self`
        // (callers size them from the same shapes); the value borrows them without copying.
        status_ok(unsafe {
            (api.CreateTensorWithDataAsOrtValue)(
                self.memory.as_ptr(),
                data,
                len,
                shape.as_ptr(),
                shape.len(),
                dtype,
                &mut value,
            )
        })?;
        // Within the capacity reserved at creation, so this does not allocate.
        self.step_values.push(value);
        let binding = self.binding.as_ptr();
        // SAFETY: binding, name and value are live; the binding takes its own reference.
        status_ok(unsafe {
            if input {
                (api.BindInput)(binding, name.as_ptr(), value)
            } else {
                (api.BindOutput)(binding, name.as_ptr(), value)
            }
        })
    }
}

impl Decoder for OrtSession<'_> {
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError> {
        self.check(tokens)?;
        let mut last = 0;
        for chunk in tokens.chunks(self.batch) {
            self.step(chunk)?;
            last = chunk.len() - 1;
        }
        let vocab = self.model.facts.vocab_size;
        Ok(&self.logits[last * vocab..(last + 1) * vocab])
    }

    fn forward_all(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError> {
        if !self.logits_all || tokens.len() > self.batch {
            return Err(SessionError::NotLogitsAll { batch: self.batch });
        }
        self.check(tokens)?;
        self.step(tokens)?;
        Ok(&self.logits[..tokens.len() * self.model.facts.vocab_size])
    }

    fn position(&self) -> usize {
        self.pos
    }

    fn context(&self) -> usize {
        self.context
    }

    /// The cache is laid out `[kv_heads, pos, head_dim]`, so keeping a prefix re-packs each
    /// head's rows to the shorter stride.
    fn rewind(&mut self, pos: usize) {
        if pos >= self.pos {
            return;
        }
        let f = &self.model.facts;
        let (old, hd) = (self.pos, f.head_dim);
        for i in 0..2 * f.layers {
            let slot = &mut self.kv[self.current][i * self.slot..(i + 1) * self.slot];
            for h in 0..f.kv_heads {
                slot.copy_within(h * old * hd..(h * old + pos) * hd, h * pos * hd);
            }
        }
        self.pos = pos;
    }

    fn backend_name(&self) -> String {
        self.model.describe()
    }
}

impl Drop for OrtSession<'_> {
    fn drop(&mut self) {
        let api = ::ort::api();
        // SAFETY: both were created in `new`, are owned by `self` alone and released once.
        unsafe {
            (api.ReleaseIoBinding)(self.binding.as_ptr());
            (api.ReleaseMemoryInfo)(self.memory.as_ptr());
        }
    }
}
