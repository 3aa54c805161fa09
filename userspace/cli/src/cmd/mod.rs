pub mod bridge;
pub mod doctor;
pub mod lab;
pub mod redirect;
pub mod scope;
pub mod up;
