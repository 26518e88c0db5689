//! Standard Webhooks verification written from the specification, sharing no
//! code with gancho's signer: HMAC from its definition over SHA-256, and a
//! base64 encoder of its own.

use sha2::{Digest, Sha256};

const BLOCK: usize = 64;

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block_key = [0u8; BLOCK];
    if key.len() > BLOCK {
        block_key[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block_key[..key.len()].copy_from_slice(key);
    }
    let inner_pad: Vec<u8> = block_key.iter().map(|byte| byte ^ 0x36).collect();
    let outer_pad: Vec<u8> = block_key.iter().map(|byte| byte ^ 0x5c).collect();

    let inner = Sha256::new().chain_update(&inner_pad).chain_update(message).finalize();
    Sha256::new()
        .chain_update(&outer_pad)
        .chain_update(inner)
        .finalize()
        .into()
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut output = String::new();
    for chunk in bytes.chunks(3) {
        let padded = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let number = (u32::from(padded[0]) << 16) | (u32::from(padded[1]) << 8) | u32::from(padded[2]);
        for position in 0..4 {
            if position <= chunk.len() {
                output.push(ALPHABET[((number >> (18 - 6 * position)) & 63) as usize] as char);
            } else {
                output.push('=');
            }
        }
    }
    output
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut bits = 0u32;
    let mut bit_count = 0;
    let mut output = Vec::new();
    for character in text.bytes().filter(|byte| *byte != b'=') {
        let value = ALPHABET
            .iter()
            .position(|candidate| *candidate == character)
            .expect("valid base64") as u32;
        bits = (bits << 6) | value;
        bit_count += 6;
        if bit_count >= 8 {
            bit_count -= 8;
            output.push((bits >> bit_count) as u8);
        }
    }
    output
}

/// The `v1,...` signature the specification defines for these inputs.
pub fn expected_signature(secret: &str, webhook_id: &str, timestamp: &str, body: &[u8]) -> String {
    let key = base64_decode(secret.strip_prefix("whsec_").expect("a whsec_ secret"));
    let mut message = format!("{webhook_id}.{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    format!("v1,{}", base64_encode(&hmac_sha256(&key, &message)))
}

#[test]
fn independent_verifier_matches_specification_vector() {
    assert_eq!(
        expected_signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#
        ),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
    assert_eq!(base64_encode(b"ab"), "YWI=");
    assert_eq!(base64_decode("YWI="), b"ab");
}
