// Medical Diffusion: what gradio cannot do by itself.
// Arrow keys nudge the inpainting mask's centre after a click on the overlay (Shift: 10 steps).
// Loaded by the webui from this folder automatically, and by `meddiff ui` explicitly.
(function () {
    "use strict";
    if (window.medicalDiffusionLoaded) return;
    window.medicalDiffusionLoaded = true;

    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function numberField(id) {
        return root().querySelector("#" + id + " input[type=number]") ||
            root().querySelector("#" + id + " input");
    }

    let armed = false;
    document.addEventListener("click", function (event) {
        const overlay = root().querySelector("#md_inp_overlay");
        armed = !!(overlay && event.composedPath().includes(overlay));
    }, true);

    const moves = {ArrowLeft: ["md_inp_cx", -1], ArrowRight: ["md_inp_cx", 1],
                   ArrowUp: ["md_inp_cy", -1], ArrowDown: ["md_inp_cy", 1]};
    document.addEventListener("keydown", function (event) {
        if (!armed || !(event.key in moves)) return;
        const [id, sign] = moves[event.key];
        const field = numberField(id);
        if (!field) return;
        event.preventDefault();
        const step = event.shiftKey ? 10 : 1;
        field.value = String((parseFloat(field.value) || 0) + sign * step);
        field.dispatchEvent(new Event("input", {bubbles: true}));
        field.dispatchEvent(new Event("change", {bubbles: true}));
    });
})();
