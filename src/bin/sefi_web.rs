fn main() {
    sefi::app::mount();
}
