pub mod bridge;
pub mod doctor;
pub mod redirect;
pub mod scope;
