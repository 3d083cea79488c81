//! Image keys: the names visitors give their images.
//!
//! A key travels far: it is a URL path segment (`/api/v1/images/{key}`), part of a memcached
//! key (behind a short prefix, within the protocol's 250 bytes), an object name in S3 and a
//! file name in the local store, a SQL parameter, and text on HTML pages. The rule is the
//! intersection of what all of those take without escaping, so no layer has to encode it:
//!
//! - **1 to 200 characters.** Memcached allows 250 bytes and the cache adds a prefix; file
//!   systems allow 255 bytes per name; 200 leaves room for both and is more than any name a
//!   person types.
//! - **`A-Z a-z 0-9 . _ -` only.** These are the RFC 3986 "unreserved" characters minus `~`:
//!   nothing needs percent-encoding in a URL, quoting in HTML, or escaping in a shell or a
//!   memcached command line, and there is no `/` to make a path or a space to split a command.
//!   ASCII only, so two keys that look alike are the same bytes (no Unicode confusables or
//!   normalisation forms).
//! - **Starting with a letter or digit.** A leading `.` makes hidden files and the `.`/`..`
//!   path components; a leading `-` reads as an option to command-line tools an operator
//!   might point at the image directory.
//!
//! Keys are case-sensitive (`Cat.png` and `cat.png` are two images), as in S3 and on Linux
//! file systems.
//!
//! [`ImageKey`] is the checked form: code that holds one knows the rule was applied, so the
//! store and the cache take `&ImageKey`, never a raw string.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest key, in characters (= bytes: keys are ASCII).
pub const MAX_KEY_LEN: usize = 200;

/// The rule, as every rejection states it.
const RULE: &str = "keys are 1 to 200 characters: letters A-Z and a-z, digits 0-9, '.', '_' \
                    and '-', starting with a letter or digit";

/// A key that breaks the rule. The message says what is wrong and what is allowed; it quotes
/// at most the offending character, never the whole key (which may be long or hostile).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid image key: {problem}; {RULE}")]
pub struct KeyError {
    problem: String,
}

impl KeyError {
    /// What is wrong with the key, without the rule.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

/// A key that follows the rule (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageKey(String);

impl ImageKey {
    /// Checks `key` against the rule.
    pub fn parse(key: &str) -> Result<ImageKey, KeyError> {
        check(key)?;
        Ok(ImageKey(key.to_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check(key: &str) -> Result<(), KeyError> {
    let problem = |problem: String| Err(KeyError { problem });
    let Some(first) = key.chars().next() else {
        return problem("the key is empty".into());
    };
    if let Some((at, c)) = key.chars().enumerate().find(|&(_, c)| !allowed(c)) {
        return problem(format!(
            "character {c:?} at position {} is not allowed",
            at + 1
        ));
    }
    // Every character is ASCII now, so the byte length is the character count.
    if key.len() > MAX_KEY_LEN {
        return problem(format!("the key has {} characters", key.len()));
    }
    if !first.is_ascii_alphanumeric() {
        return problem(format!("the key starts with {first:?}"));
    }
    Ok(())
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

impl TryFrom<String> for ImageKey {
    type Error = KeyError;

    fn try_from(key: String) -> Result<ImageKey, KeyError> {
        check(&key)?;
        Ok(ImageKey(key))
    }
}

impl std::str::FromStr for ImageKey {
    type Err = KeyError;

    fn from_str(key: &str) -> Result<ImageKey, KeyError> {
        ImageKey::parse(key)
    }
}

impl From<ImageKey> for String {
    fn from(key: ImageKey) -> String {
        key.0
    }
}

impl AsRef<str> for ImageKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(key: &str) -> String {
        ImageKey::parse(key).unwrap_err().problem().to_owned()
    }

    #[test]
    fn accepts_names_people_give_images() {
        for key in [
            "cat",
            "cat.png",
            "Holiday_2024-08-01.jpeg",
            "0",
            "a..b",
            "x-",
            "IMG_0001.JPG",
        ] {
            assert_eq!(ImageKey::parse(key).unwrap().as_str(), key);
        }
        assert!(ImageKey::parse(&"k".repeat(MAX_KEY_LEN)).is_ok());
    }

    #[test]
    fn rejects_empty_and_overlong_keys() {
        assert_eq!(problem(""), "the key is empty");
        assert_eq!(
            problem(&"k".repeat(MAX_KEY_LEN + 1)),
            "the key has 201 characters"
        );
    }

    #[test]
    fn rejects_path_and_command_tricks_by_their_first_character() {
        assert_eq!(problem(".hidden"), "the key starts with '.'");
        assert_eq!(problem(".."), "the key starts with '.'");
        assert_eq!(problem("-rf"), "the key starts with '-'");
        assert_eq!(problem("_x"), "the key starts with '_'");
    }

    #[test]
    fn names_the_first_character_not_allowed_and_its_position() {
        assert_eq!(problem("a/b"), "character '/' at position 2 is not allowed");
        assert_eq!(
            problem("../etc/passwd"),
            "character '/' at position 3 is not allowed"
        );
        assert_eq!(
            problem("cat photo"),
            "character ' ' at position 4 is not allowed"
        );
        assert_eq!(
            problem("a\r\nset x"),
            "character '\\r' at position 2 is not allowed"
        );
        assert_eq!(
            problem("caf\u{e9}"),
            "character 'é' at position 4 is not allowed"
        );
        assert_eq!(
            problem("a%2F"),
            "character '%' at position 2 is not allowed"
        );
        assert_eq!(problem("~x"), "character '~' at position 1 is not allowed");
    }

    #[test]
    fn an_overlong_key_of_bad_characters_is_reported_by_its_character() {
        // The character is the more useful complaint, and counting a non-ASCII key's
        // length in bytes would misstate it.
        let key = "é".repeat(150);
        assert_eq!(problem(&key), "character 'é' at position 1 is not allowed");
    }

    #[test]
    fn the_message_states_the_rule_and_not_the_key() {
        let key = format!("{}<script>", "a".repeat(50));
        let message = ImageKey::parse(&key).unwrap_err().to_string();
        assert_eq!(
            message,
            "invalid image key: character '<' at position 51 is not allowed; keys are 1 to 200 \
             characters: letters A-Z and a-z, digits 0-9, '.', '_' and '-', starting with a \
             letter or digit"
        );
        assert!(!message.contains("aaaa"));
    }

    #[test]
    fn deserialising_applies_the_rule() {
        let key: ImageKey = serde_json::from_str("\"cat.png\"").unwrap();
        assert_eq!(key.as_str(), "cat.png");
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"cat.png\"");
        let err = serde_json::from_str::<ImageKey>("\"../x\"").unwrap_err();
        assert!(err.to_string().contains("invalid image key"), "{err}");
    }
}
