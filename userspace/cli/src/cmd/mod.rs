pub mod doctor;
pub mod redirect;
