//! Key-file text: parsing never panics, and what parses renders to text
//! that parses to the same keys.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::spa::keyfile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(keys) = keyfile::parse(text) else {
        return;
    };
    let rendered = keyfile::render(&keys);
    assert_eq!(
        keyfile::parse(&rendered).as_ref(),
        Ok(&keys),
        "render(parse(text)) parses back"
    );
});
