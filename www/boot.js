// Starts the app's wasm. Kept out of index.html so that the Content-Security-Policy can forbid
// inline scripts; trunk fills in the hashed file names as data attributes.
(function () {
  const script = document.currentScript;
  import(script.dataset.js)
    .then((bindings) => bindings.default({ module_or_path: script.dataset.wasm }))
    .catch((error) => {
      const note = document.createElement("p");
      note.setAttribute("role", "alert");
      note.className = "boot-error";
      note.textContent =
        "SeFi Studio could not start: " + error + ". It needs a browser with WebAssembly (any current Chrome, Edge, Firefox or Safari).";
      document.body.appendChild(note);
      console.error(error);
    });
})();
