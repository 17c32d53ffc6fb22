use kiln_runtime::tokenizer::{Tokenizer, TokenizerData};
use std::time::Instant;
#[test]
fn probe() {
    let bytes = std::fs::read("/tmp/dl/lm/llama_models/llama3/tokenizer.model").unwrap();
    let t = Instant::now();
    let data = TokenizerData::from_tiktoken(&bytes).unwrap();
    eprintln!("from_tiktoken {:?}", t.elapsed());
    let t = Instant::now();
    let tok = Tokenizer::new(&data).unwrap();
    eprintln!("new {:?}", t.elapsed());
    let t = Instant::now();
    let b = data.to_bytes();
    eprintln!("to_bytes {:?} {} bytes", t.elapsed(), b.len());
    let t = Instant::now();
    let _ = TokenizerData::from_bytes(&b).unwrap();
    eprintln!("from_bytes {:?}", t.elapsed());
    let t = Instant::now();
    let j = data.to_tokenizer_json().unwrap();
    eprintln!("to_json {:?} {} bytes", t.elapsed(), j.len());
    let t = Instant::now();
    let d2 = TokenizerData::from_tokenizer_json(j.as_bytes()).unwrap();
    eprintln!("from_json {:?}", t.elapsed());
    let t = Instant::now();
    let _tok2 = Tokenizer::new(&d2).unwrap();
    eprintln!("new(list) {:?}", t.elapsed());
    let text = std::fs::read_to_string("/work/main/testdata/golden/apache-2.0.txt").unwrap();
    eprintln!("apache {} bytes", text.len());
    for _ in 0..3 {
        let t = Instant::now();
        let ids = tok.encode(&text, false);
        eprintln!("encode ranks {:?} {} ids", t.elapsed(), ids.len());
        let t = Instant::now();
        let ids2 = _tok2.encode(&text, false);
        eprintln!("encode list {:?}", t.elapsed());
        assert_eq!(ids, ids2);
    }
    for n in [10_000usize, 100_000, 1_000_000] {
        for s in [" ", "a", "9", "\n", " \n", "日"] {
            let text = s.repeat(n);
            let t = Instant::now();
            let ids = tok.encode(&text, false);
            assert_eq!(tok.decode(&ids), text);
            eprintln!("{n} x {s:?}: {:?} {} ids", t.elapsed(), ids.len());
        }
    }
}
