//! The web app: image site and manager UI.
//!
//! Empty until the web issue lands; the crate exists so the workspace layout matches the
//! design brief.
