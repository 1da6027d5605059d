// pybind11 binding: chorus.native._wsframe, the hub's own frame codec (wsframe.cpp) for Python.
//
// One parser in C++: the hub parses its viewers' frames with wsframe.cpp, and this module puts
// the same code behind the API of chorus.native.codec_pure (the pure twin and reference), so
// tests/test_codec.py feeds both the same vectors, chunkings and seeded input byte for byte.
// Nothing of the hub's serving path goes through here; only encode_close is used by the
// gateway (refusals written before a socket reaches the hub).
//
// ProtocolError is codec_pure's class, so `except chorus.native.ProtocolError` catches the
// errors of whichever parser the switch chose.
#define PY_SSIZE_T_CLEAN  // Py_BuildValue's y# takes a Py_ssize_t length
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "wsframe.hpp"

namespace py = pybind11;
namespace ws = chorus::ws;

namespace {

constexpr int COMPRESSED = 0x100;  // OR-ed into a message's opcode when it had RSV1 (RFC 7692 6)
constexpr size_t KEEP_INPUT_BYTES = 65536;  // a bigger copy buffer is freed after its feed

// codec_pure.ProtocolError, looked up once at import; a new reference kept for the process.
PyObject* protocol_error_type = nullptr;

// A read-only view of a bytes-like object, released when it goes out of scope.
class BufferView {
public:
    explicit BufferView(py::handle obj) {
        if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
    }
    ~BufferView() { PyBuffer_Release(&view_); }
    BufferView(const BufferView&) = delete;
    BufferView& operator=(const BufferView&) = delete;
    const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
    size_t size() const { return static_cast<size_t>(view_.len); }

private:
    Py_buffer view_{};
};

// A new bytes object of `n` bytes for the caller to fill.
py::bytes new_bytes(size_t n, uint8_t*& dst) {
    PyObject* obj = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n));
    if (obj == nullptr) throw py::error_already_set();
    dst = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(obj));
    return py::reinterpret_steal<py::bytes>(obj);
}

// --- encoding (server frames, never masked: RFC 6455 5.1) ---

bool known_opcode(int op) {
    return (ws::OP_CONT <= op && op <= ws::OP_BINARY) || (ws::OP_CLOSE <= op && op <= ws::OP_PONG);
}

void check_frame(int opcode, bool fin, size_t length) {
    if (!known_opcode(opcode)) throw py::value_error("unknown opcode " + std::to_string(opcode));
    if (opcode >= ws::OP_CLOSE && (!fin || length > ws::MAX_CONTROL_PAYLOAD))  // RFC 6455 5.5
        throw py::value_error("a control frame must be final and at most 125 bytes");
}

py::bytes encode_frame(int opcode, py::handle payload, bool fin, bool rsv1) {
    BufferView view(payload);
    check_frame(opcode, fin, view.size());
    uint8_t* dst = nullptr;
    py::bytes frame = new_bytes(ws::header_size(view.size()) + view.size(), dst);
    size_t h = ws::write_header(dst, static_cast<uint8_t>(opcode), view.size(), fin, rsv1);
    std::memcpy(dst + h, view.data(), view.size());
    return frame;
}

py::bytes encode_frames(int opcode, py::handle payloads) {
    // Views of every payload first: the output is sized and allocated once (one write per flush).
    py::object seq = py::reinterpret_steal<py::object>(PySequence_Fast(payloads.ptr(), "payloads must be a sequence"));
    if (!seq) throw py::error_already_set();
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(seq.ptr());
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    std::vector<std::unique_ptr<BufferView>> views;
    views.reserve(static_cast<size_t>(count));
    size_t total = 0;
    for (Py_ssize_t i = 0; i < count; ++i) {
        views.push_back(std::make_unique<BufferView>(items[i]));
        check_frame(opcode, true, views.back()->size());
        total += ws::header_size(views.back()->size()) + views.back()->size();
    }
    uint8_t* dst = nullptr;
    py::bytes out = new_bytes(total, dst);
    for (const auto& view : views) {
        dst += ws::write_header(dst, static_cast<uint8_t>(opcode), view->size());
        std::memcpy(dst, view->data(), view->size());
        dst += view->size();
    }
    return out;
}

py::bytes encode_close(int code, py::handle reason) {
    if (!ws::valid_close_code_to_send(code)) throw py::value_error("close code " + std::to_string(code) + " may not be sent");
    if (!PyUnicode_Check(reason.ptr())) throw py::type_error("reason must be a str");
    Py_ssize_t n = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(reason.ptr(), &n);  // UnicodeEncodeError for surrogates
    if (utf8 == nullptr) throw py::error_already_set();
    std::string frame = ws::close_frame(code, std::string(utf8, static_cast<size_t>(n)));
    return py::bytes(frame.data(), frame.size());
}

bool validate_utf8(py::handle data) {
    BufferView view(data);
    return ws::utf8_valid(view.data(), view.size());
}

// --- parsing (client frames) ---

// Appends what parse_frames completes to a Python list as (opcode, bytes) tuples. A failed
// allocation stops the parse; the Python error stays set for feed() to raise.
class ListSink : public ws::FrameSink {
public:
    explicit ListSink(PyObject* out) : out_(out) {}
    bool on_message(uint8_t opcode, bool compressed, const uint8_t* data, size_t n) override {
        return append(opcode | (compressed ? COMPRESSED : 0), data, n);
    }
    bool on_control(uint8_t opcode, const uint8_t* data, size_t n) override { return append(opcode, data, n); }

private:
    bool append(int opcode, const uint8_t* data, size_t n) {
        PyObject* item = Py_BuildValue("(iy#)", opcode, reinterpret_cast<const char*>(data), static_cast<Py_ssize_t>(n));
        if (item == nullptr) return false;
        const int rc = PyList_Append(out_, item);
        Py_DECREF(item);
        return rc == 0;
    }

    PyObject* out_;
};

// An incremental parser of CLIENT frames with codec_pure.FrameParser's API and behaviour,
// down to each error's close code and reason. After an error it is failed for good: every later
// feed() raises the same exception again.
class FrameParser {
public:
    FrameParser(int64_t max_message_size, int64_t max_fragments, bool require_mask, bool allow_rsv1) {
        if (max_message_size < 0 || max_fragments < 0)
            throw py::value_error("max_message_size and max_fragments must be >= 0");
        limits_.max_message_bytes = static_cast<uint64_t>(max_message_size);
        limits_.max_fragments = static_cast<uint32_t>(std::min<int64_t>(max_fragments, UINT32_MAX));
        limits_.require_mask = require_mask;
        limits_.allow_rsv1 = allow_rsv1;
    }

    py::list feed(py::handle data) {
        if (error_) raise(error_);
        {
            // parse_frames unmasks in place: the caller's bytes are read-only, so parse a copy.
            BufferView view(data);
            input_.assign(reinterpret_cast<const char*>(view.data()), view.size());
        }
        py::list out;
        ListSink sink(out.ptr());
        ws::ParseResult result = ws::parse_frames(state_, limits_, reinterpret_cast<uint8_t*>(input_.data()), input_.size(), sink);
        if (input_.capacity() > KEEP_INPUT_BYTES) std::string().swap(input_);
        if (result.ok()) return out;
        // Messages completed earlier in this call are dropped with the error: the connection closes.
        if (result.stopped) fail(py::error_already_set().value());  // the sink could not allocate (set by it)
        else fail(py::handle(protocol_error_type)(result.close_code, result.reason));
        raise(error_);
    }

    int64_t max_message_size() const { return static_cast<int64_t>(limits_.max_message_bytes); }
    int64_t max_fragments() const { return limits_.max_fragments; }
    bool require_mask() const { return limits_.require_mask; }
    bool allow_rsv1() const { return limits_.allow_rsv1; }

private:
    // Keep the error and drop the state (unspecified after an error, and its buffers with it).
    void fail(py::object exc) {
        error_ = std::move(exc);
        state_ = ws::ParseState();
        std::string().swap(input_);
    }

    [[noreturn]] static void raise(const py::object& exc) {
        PyException_SetTraceback(exc.ptr(), Py_None);  // as codec_pure: exc.with_traceback(None)
        PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
        throw py::error_already_set();
    }

    ws::ParserLimits limits_;
    ws::ParseState state_;
    std::string input_;  // this feed's bytes, unmasked in place by parse_frames
    py::object error_;  // the exception that failed the parser, or empty
};

}  // namespace

PYBIND11_MODULE(_wsframe, m) {
    m.doc() = "RFC 6455 frame codec: the hub's C++ parser and encoder (wsframe.cpp), with codec_pure's API.";
    py::object error_type = py::module_::import("chorus.native.codec_pure").attr("ProtocolError");
    protocol_error_type = error_type.release().ptr();

    m.attr("OP_CONT") = int(ws::OP_CONT);
    m.attr("OP_TEXT") = int(ws::OP_TEXT);
    m.attr("OP_BINARY") = int(ws::OP_BINARY);
    m.attr("OP_CLOSE") = int(ws::OP_CLOSE);
    m.attr("OP_PING") = int(ws::OP_PING);
    m.attr("OP_PONG") = int(ws::OP_PONG);
    m.attr("COMPRESSED") = COMPRESSED;
    m.attr("CLOSE_PROTOCOL_ERROR") = int(ws::CLOSE_PROTOCOL_ERROR);
    m.attr("CLOSE_INVALID_DATA") = int(ws::CLOSE_INVALID_DATA);
    m.attr("CLOSE_TOO_BIG") = int(ws::CLOSE_TOO_BIG);
    m.attr("ProtocolError") = py::handle(protocol_error_type);

    m.def("encode_frame", &encode_frame, "A server (unmasked) frame: 7/16/64-bit lengths (RFC 6455 5.2).",
          py::arg("opcode"), py::arg("payload"), py::arg("fin") = true, py::arg("rsv1") = false);
    m.def("encode_frames", &encode_frames, "Several whole frames concatenated, built in one allocation.",
          py::arg("opcode"), py::arg("payloads"));
    m.def("encode_close", &encode_close, "A server close frame; reason cut to 123 bytes on a UTF-8 boundary.",
          py::arg("code"), py::arg("reason") = "");
    m.def("validate_utf8", &validate_utf8, "True if data is well-formed UTF-8 (RFC 3629).", py::arg("data"));

    py::class_<FrameParser>(m, "FrameParser", "Incremental parser of CLIENT frames (masked): feed bytes, get messages.")
        .def(py::init<int64_t, int64_t, bool, bool>(), py::arg("max_message_size") = 65536,
             py::arg("max_fragments") = 64, py::arg("require_mask") = true, py::arg("allow_rsv1") = false)
        .def("feed", &FrameParser::feed, "The messages and control frames completed by data, in order.",
             py::arg("data"))
        .def_property_readonly("max_message_size", &FrameParser::max_message_size)
        .def_property_readonly("max_fragments", &FrameParser::max_fragments)
        .def_property_readonly("require_mask", &FrameParser::require_mask)
        .def_property_readonly("allow_rsv1", &FrameParser::allow_rsv1);

    m.attr("__all__") = py::make_tuple("CLOSE_INVALID_DATA", "CLOSE_PROTOCOL_ERROR", "CLOSE_TOO_BIG", "COMPRESSED",
                                       "OP_BINARY", "OP_CLOSE", "OP_CONT", "OP_PING", "OP_PONG", "OP_TEXT",
                                       "FrameParser", "ProtocolError", "encode_close", "encode_frame",
                                       "encode_frames", "validate_utf8");
}
