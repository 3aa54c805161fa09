pub mod bridge;
pub mod doctor;
pub mod install;
pub mod intercept;
pub mod lab;
mod recorded;
pub mod redirect;
pub mod service;
pub mod up;
