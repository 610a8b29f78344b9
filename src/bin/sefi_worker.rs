fn main() {
    sefi::app::worker::register();
}
