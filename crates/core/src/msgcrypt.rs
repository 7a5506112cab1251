//! WeChat's message encryption, as the third-party platform's callbacks use it
//! (the scheme of WeChat's `WXBizMsgCrypt` samples).
//!
//! `msg_signature` = SHA-1 (hex) of the sorted concatenation of the
//! platform's token, `timestamp`, `nonce` and the `Encrypt` text. `Encrypt`
//! is base64 of AES-256-CBC with key = base64-decode(EncodingAESKey + "="),
//! IV = the key's first 16 bytes, PKCS#7 padding to 32-byte blocks, over:
//! 16 random bytes, the message length (4 bytes, big-endian), the message,
//! the component appid.

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::Engine;

type Decryptor = cbc::Decryptor<aes::Aes256>;
type Encryptor = cbc::Encryptor<aes::Aes256>;

/// WeChat pads to 32-byte blocks (PKCS#7 with k = 32), not AES's 16.
const PAD_BLOCK: usize = 32;

/// Why a callback is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CryptError {
    #[error("msg_signature is not 40 lowercase hex characters, as WeChat writes a SHA-1")]
    SignatureForm,
    #[error("msg_signature does not match (wrong token, or not from WeChat)")]
    Signature,
    #[error("Encrypt is not base64 of whole AES blocks")]
    Base64,
    #[error("Encrypt does not decrypt with encoding_aes_key (wrong key, or not from WeChat)")]
    Decrypt,
    #[error("the message is addressed to appid {0}, not this platform's component_appid")]
    AppId(String),
}

/// A `msg_signature` in the one spelling WeChat sends: 40 lowercase hex
/// characters. Anything else (whitespace around it, `+`, upper case) is
/// refused before it is compared, so the replay mark taken from it names
/// the callback, not one of its spellings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature(String);

impl Signature {
    /// The signature as given, if it is in WeChat's form.
    pub fn parse(text: &str) -> Result<Self, CryptError> {
        let canonical =
            text.len() == 40 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match canonical {
            true => Ok(Signature(text.to_string())),
            false => Err(CryptError::SignatureForm),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One platform's token, key and component appid.
pub struct MsgCrypt {
    token: crate::secret::Secret,
    key: [u8; 32],
    appid: String,
}

impl MsgCrypt {
    /// `encoding_aes_key`: the 43 characters the platform's console shows.
    pub fn new(
        token: crate::secret::Secret,
        encoding_aes_key: &str,
        appid: &str,
    ) -> Result<Self, String> {
        let key = decode_key(encoding_aes_key)?;
        Ok(MsgCrypt {
            token,
            key,
            appid: appid.to_string(),
        })
    }

    /// `msg_signature` for `encrypt` at `timestamp` and `nonce`.
    pub fn signature(&self, timestamp: &str, nonce: &str, encrypt: &str) -> String {
        let mut parts = [self.token.expose(), timestamp, nonce, encrypt];
        parts.sort_unstable();
        let digest = ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            parts.concat().as_bytes(),
        );
        hex(digest.as_ref())
    }

    /// Checks the signature (in constant time) and decrypts: the message.
    pub fn open(
        &self,
        signature: &Signature,
        timestamp: &str,
        nonce: &str,
        encrypt: &str,
    ) -> Result<String, CryptError> {
        let expected = self.signature(timestamp, nonce, encrypt);
        if !crate::secret::constant_time_eq(expected.as_bytes(), signature.as_str().as_bytes()) {
            return Err(CryptError::Signature);
        }
        self.decrypt(encrypt)
    }

    /// Decrypts `Encrypt`; the message, once its appid is checked.
    pub fn decrypt(&self, encrypt: &str) -> Result<String, CryptError> {
        let data = base64::engine::general_purpose::STANDARD
            .decode(encrypt.trim())
            .map_err(|_| CryptError::Base64)?;
        if data.is_empty() || data.len() % 16 != 0 {
            return Err(CryptError::Base64);
        }
        let mut buf = data;
        let plain = Decryptor::new(&self.key.into(), self.key[..16].into())
            .decrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut buf)
            .map_err(|_| CryptError::Decrypt)?;
        let pad = *plain.last().ok_or(CryptError::Decrypt)? as usize;
        if pad == 0 || pad > PAD_BLOCK || pad > plain.len() {
            return Err(CryptError::Decrypt);
        }
        let body = &plain[..plain.len() - pad];
        if body.len() < 20 {
            return Err(CryptError::Decrypt);
        }
        let len = u32::from_be_bytes(body[16..20].try_into().expect("4 bytes")) as usize;
        let rest = &body[20..];
        if len > rest.len() {
            return Err(CryptError::Decrypt);
        }
        let (msg, appid) = rest.split_at(len);
        let appid = String::from_utf8_lossy(appid);
        if appid != self.appid {
            return Err(CryptError::AppId(appid.chars().take(64).collect()));
        }
        String::from_utf8(msg.to_vec()).map_err(|_| CryptError::Decrypt)
    }

    /// `msg` as WeChat posts it: the query (`signature`, `timestamp`,
    /// `nonce`, `encrypt_type=aes`, `msg_signature`) and the XML body with
    /// `<AppId>` and `<Encrypt>`, at `timestamp` with `nonce` (the fake's
    /// pushes, and events handed on to the app in WeChat's format).
    pub fn seal(&self, msg: &str, timestamp: &str, nonce: &str) -> (String, String) {
        let encrypt = self.encrypt(msg, rand::random());
        let msg_signature = self.signature(timestamp, nonce, &encrypt);
        let mut parts = [self.token.expose(), timestamp, nonce];
        parts.sort_unstable();
        let signature = hex(ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            parts.concat().as_bytes(),
        )
        .as_ref());
        (
            format!("signature={signature}&timestamp={timestamp}&nonce={nonce}&encrypt_type=aes&msg_signature={msg_signature}"),
            format!(
                "<xml><AppId><![CDATA[{}]]></AppId><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>",
                self.appid
            ),
        )
    }

    /// Encrypts `msg` with `random` as its first 16 bytes (the fake WeChat
    /// and the tests push events this way).
    pub fn encrypt(&self, msg: &str, random: [u8; 16]) -> String {
        let mut plain = Vec::with_capacity(msg.len() + self.appid.len() + 52);
        plain.extend_from_slice(&random);
        plain.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        plain.extend_from_slice(msg.as_bytes());
        plain.extend_from_slice(self.appid.as_bytes());
        let pad = PAD_BLOCK - plain.len() % PAD_BLOCK;
        plain.extend(std::iter::repeat_n(pad as u8, pad));
        let len = plain.len();
        let out = Encryptor::new(&self.key.into(), self.key[..16].into())
            .encrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut plain, len)
            .expect("whole blocks");
        base64::engine::general_purpose::STANDARD.encode(out)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 32-byte key of a 43-character EncodingAESKey.
fn decode_key(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    if text.len() != 43 {
        return Err(format!(
            "must be the 43 characters the platform's console shows (got {})",
            text.len()
        ));
    }
    // WeChat's keys end in a character whose low bits the 32 bytes do not
    // use: a strict decoder refuses them, WeChat's own samples do not.
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    let bytes = lenient
        .decode(format!("{text}="))
        .map_err(|_| "is not base64 (letters, digits, + and /)".to_string())?;
    bytes
        .try_into()
        .map_err(|_| "does not decode to 32 bytes".to_string())
}

/// The text of `<tag>` in WeChat's flat XML (CDATA or plain); `None` when
/// absent. The callbacks' XML is one level of simple elements: no general
/// XML parser needed, and none that expands entities.
pub fn xml_field<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    let inner = xml[start..end].trim();
    Some(
        inner
            .strip_prefix("<![CDATA[")
            .and_then(|s| s.strip_suffix("]]>"))
            .unwrap_or(inner),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// WeChat's own sample (the `WXBizMsgCrypt` demo's decrypt case).
    const SAMPLE_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    const SAMPLE_ENCRYPT: &str = "hyzAe4OzmOMbd6TvGdIOO6uBmdJoD0Fk53REIHvxYtJlE2B655HuD0m8KUePWB3+LrPXo87wzQ1QLvbeUgmBM4x6F8PGHQHFVAFmOD2LdJF9FrXpbUAh0B5GIItb52sn896wVsMSHGuPE328HnRGBcrS7C41IzDWyWNlZkyyXwon8T332jisa+h6tEDYsVticbSnyU8dKOIbgU6ux5VTjg3yt+WGzjlpKn6NPhRjpA912xMezR4kw6KWwMrCVKSVCZciVGCgavjIQ6X8tCOp3yZbGpy0VxpAe+77TszTfRd5RJSVO/HTnifJpXgCSUdUue1v6h0EIBYYI1BD1DlD+C0CR8e6OewpusjZ4uBl9FyJvnhvQl+q5rv1ixrcpCumEPo5MJSgM9ehVsNPfUM669WuMyVWQLCzpu9GhglF2PE=";

    fn sample() -> MsgCrypt {
        MsgCrypt::new(
            crate::secret::Secret::new("spamtest"),
            SAMPLE_KEY,
            "wx2c2769f8efd9abc2",
        )
        .unwrap()
    }

    #[test]
    fn wechats_published_sample_verifies_and_decrypts() {
        let c = sample();
        assert_eq!(
            c.signature("1409735669", "1320562132", SAMPLE_ENCRYPT),
            "5d197aaffba7e9b25a30732f161a50dee96bd5fa"
        );
        let msg = c
            .open(
                &Signature::parse("5d197aaffba7e9b25a30732f161a50dee96bd5fa").unwrap(),
                "1409735669",
                "1320562132",
                SAMPLE_ENCRYPT,
            )
            .unwrap();
        assert!(msg.starts_with("<xml>") && msg.ends_with("</xml>"), "{msg}");
        assert_eq!(xml_field(&msg, "MsgType"), Some("text"));
        // A wrong signature, a wrong appid, a wrong key: refused.
        assert_eq!(
            c.open(
                &Signature::parse(&"0".repeat(40)).unwrap(),
                "1409735669",
                "1320562132",
                SAMPLE_ENCRYPT
            ),
            Err(CryptError::Signature)
        );
        let other = MsgCrypt::new(
            crate::secret::Secret::new("spamtest"),
            SAMPLE_KEY,
            "wxother",
        )
        .unwrap();
        assert!(matches!(
            other.decrypt(SAMPLE_ENCRYPT),
            Err(CryptError::AppId(_))
        ));
        let wrong_key = MsgCrypt::new(
            crate::secret::Secret::new("spamtest"),
            "bbcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
            "wx2c2769f8efd9abc2",
        )
        .unwrap();
        assert!(wrong_key.decrypt(SAMPLE_ENCRYPT).is_err());
    }

    /// One spelling of a signature: whitespace, `+`, upper case, a short or
    /// long one are not WeChat's SHA-1 hex and never reach the comparison.
    #[test]
    fn a_signature_has_one_spelling() {
        let sig = "5d197aaffba7e9b25a30732f161a50dee96bd5fa";
        assert_eq!(Signature::parse(sig).unwrap().as_str(), sig);
        for bad in [
            format!("{sig} "),
            format!(" {sig}"),
            format!("{sig}\t"),
            format!("{sig}\n"),
            format!("{sig}+"),
            sig.to_uppercase(),
            sig[..39].to_string(),
            format!("{sig}0"),
            String::new(),
        ] {
            assert_eq!(
                Signature::parse(&bad),
                Err(CryptError::SignatureForm),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn encrypt_and_decrypt_round_trip_with_32_byte_padding() {
        let c = sample();
        for msg in [
            "",
            "<xml><InfoType>component_verify_ticket</InfoType></xml>",
            &"x".repeat(100),
        ] {
            let e = c.encrypt(msg, [7; 16]);
            let raw = base64::engine::general_purpose::STANDARD
                .decode(&e)
                .unwrap();
            assert_eq!(raw.len() % 32, 0, "padded to 32-byte blocks");
            assert_eq!(c.decrypt(&e).unwrap(), msg);
        }
        assert!(MsgCrypt::new(crate::secret::Secret::new("t"), "short", "a").is_err());
        assert_eq!(
            xml_field("<xml><A>1</A><B><![CDATA[x y]]></B></xml>", "B"),
            Some("x y")
        );
        assert_eq!(xml_field("<xml><A>1</A></xml>", "C"), None);
    }
}
